"""Profile decode steps of one model on the GPU: where the time goes, per op and per kernel.

Usage: PYTHONPATH=src python3 scripts/profile_decode.py synthetic:qwen3-30b-a3b [--grouped 0|1]
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.local import LocalExperts

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--grouped", type=int, default=-1)
p.add_argument("--steps", type=int, default=20)
a = p.parse_args()
ck = load(a.model, device="cuda")
if a.grouped >= 0:
    ck.model.set_experts(LocalExperts(ck.store, grouped=bool(a.grouped)))
eng = LLMEngine(ck, max_seqs=1, max_len=256)
seq = eng.add_request(list(range(10, 42)), SamplingParams(max_new_tokens=200, ignore_eos=True))
for _ in range(5):
    eng.step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(a.steps):
    eng.step()
torch.cuda.synchronize()
print(f"{a.model} grouped={a.grouped}: {(time.perf_counter() - t) / a.steps * 1000:.2f} ms/token")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
