"""Profile decode steps of one model on the GPU: where the time goes, per op and per kernel.

All on the GPU:   PYTHONPATH=src python3 scripts/probes/profile_decode.py synthetic:qwen3-30b-a3b [--grouped 0|1]
Experts offloaded (one load, each budget in turn: the bench's figures, then a torch.profiler table of the host's
time, where the per-layer planning and launching show):
    PYTHONPATH=src python3 scripts/probes/profile_decode.py synthetic:mixtral-8x7b
        --gpu-memory 24GiB,76GiB --policy auto
--prefill N also profiles the prefill of an N-token prompt (after one of the same length, which pays the one-time
costs of that size), where each layer plans and launches for many tokens.
"""

import argparse
import cProfile
import pstats
import sys
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
p.add_argument("--gpu-memory", default="", help="comma-separated budgets: offload the experts")
p.add_argument("--policy", default="auto")
p.add_argument("--routing-trace", default=None)
p.add_argument("--prefill", type=int, default=0, help="also profile the prefill of a prompt of this many tokens")
a = p.parse_args()
MAX_LEN = max(256, a.prefill + 8)


def profile_prefill(eng: LLMEngine, label: str) -> None:
    prompt = [100 + i % 1000 for i in range(a.prefill)]
    list(eng.stream(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        list(eng.stream(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))
        torch.cuda.synchronize()
    print(f"{label}: prefill of {a.prefill} tokens {(time.perf_counter() - t) * 1000:.1f} ms (profiled)", flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60), flush=True)
    # the host's Python time by function (cProfile's own cost inflates it: compare the rows with each other)
    pr = cProfile.Profile()
    pr.enable()
    list(eng.stream(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    sys.stdout.flush()


def profile_steps(eng: LLMEngine, label: str) -> None:
    seq = eng.add_request(list(range(10, 42)), SamplingParams(max_new_tokens=a.steps + 12, ignore_eos=True))
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - t) / a.steps * 1000:.2f} ms/token", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
    while not seq.finished:
        eng.step()
    if a.prefill:
        profile_prefill(eng, label)


if not a.gpu_memory:
    ck = load(a.model, device="cuda")
    if a.grouped >= 0:
        ck.model.set_experts(LocalExperts(ck.store, grouped=bool(a.grouped)))
    profile_steps(LLMEngine(ck, max_seqs=1, max_len=MAX_LEN), f"{a.model} grouped={a.grouped}")
else:
    from moeflow.bench.latency import ceilings, print_rows, run_policy
    from moeflow.config import OffloadConfig, parse_size

    ck = load(a.model, device="cuda", expert_device="cpu")
    ck.store.pin()
    ceil = ceilings(torch.device("cuda"))
    print({k: f"{v / 1e9:.1f} GB/s" for k, v in ceil.items()}, flush=True)
    prompt = list(range(100, 140))
    for budget in a.gpu_memory.split(","):
        oc = OffloadConfig(parse_size(budget), a.policy, None, a.routing_trace)
        r = run_policy(ck, oc, [prompt], list(range(100, 612)), a.steps * 2, ceil)
        print_rows([r], header=True)
        print("allocator:", r["allocator_during_decode"], "costs:", r["costs"], flush=True)
        eng = LLMEngine(ck, max_seqs=1, max_len=MAX_LEN, offload=oc)
        backend = getattr(eng.model.experts, "inner", eng.model.experts)
        profile_steps(eng, f"{a.model} {budget} {a.policy}")
        print(f"cpu_scale {backend.cpu_scale:.2f} copy_scale {getattr(backend, 'copy_scale', 1):.2f}", flush=True)
        backend.close()
        ck.model.set_experts(LocalExperts(ck.store))
        del eng, backend
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
