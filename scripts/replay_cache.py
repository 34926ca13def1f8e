"""Expert bytes moved per decode token by the real engine (the CPU as both tiers) replaying a recorded Mixtral
routing trace on a tiny model of Mixtral's routing shape (32 MoE layers, 8 experts, top-2), for given
numbers of expert slots: how a slot split or caching rule changes the misses, without a GPU.

  python scripts/replay_cache.py 62 220 [--cache 8]     (from the repo root, PYTHONPATH=src; needs .carry/data
  with the Mixtral trace and a placement from `moeflow profile-experts --trace`, see scripts/gpu_latency.sh)

--cache N overrides auto's split (N cache slots, the rest resident), to compare with its default."""

from __future__ import annotations

import argparse

from moeflow import synthetic
from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.budget import step_workspace
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.costs import ExpertCosts
from moeflow.policy.auto import AutoPolicy
from moeflow.policy.base import SlotSplit

D = ".carry/data"
# the H200 host's costs (docs/benchmarks.md, 2026-12-01): CPU expert beside copies, copy, GPU expert
COSTS = ExpertCosts((1, 4, 16, 64, 256), (6.5e-3, 7e-3, 9e-3, 12e-3, 45e-3), (2e-4,) * 5, 6.6e-3)
synthetic.PRESETS["trace-mixtral"] = dict(synthetic.PRESETS["tiny-mixtral"], num_hidden_layers=32, hidden_size=64,
                                          intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def replay(slots: int, tokens: int, max_len: int = 400) -> dict:
    ck = load("synthetic:trace-mixtral", device="cpu", expert_device="cpu", dtype="fp32")
    kv = ck.cfg.kv_bytes_per_token(ck.store.data.dtype) * max_len
    budget = ck.dense_bytes + kv + step_workspace(ck.cfg, kv, max_len, 4) + slots * ck.store.expert_bytes
    oc = OffloadConfig(budget, "auto", f"{D}/mixtral-trace-placement.json",
                       f"{D}/mixtral-8x7b-instruct.humaneval.jsonl")
    engine = LLMEngine(ck, max_seqs=1, max_len=max_len, offload=oc)
    backend = engine.model.experts.inner
    backend.costs, backend.calibrate = COSTS, False
    seq = engine.add_request([5] * 8, SamplingParams(max_new_tokens=tokens + 1, ignore_eos=True))
    engine.step()  # prefill: not counted
    before = backend.stats.as_dict()
    while not seq.finished:
        engine.step()
    d = {k: v - before[k] for k, v in backend.stats.as_dict().items() if k != "hit_rate"}
    backend.close()
    return {"slots": slots, "split": backend.split, "hit_rate": d["hits"] / d["lookups"],
            "missed_experts_per_token": d["miss_bytes"] / ck.store.expert_bytes / tokens,
            "cpu_per_token": d["cpu_experts"] / tokens, "copied_per_token": d["copied_experts"] / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slots", type=int, nargs="+")
    p.add_argument("--cache", type=int, help="cache slots instead of auto's own split")
    p.add_argument("--tokens", type=int, default=299)
    args = p.parse_args()
    if args.cache is not None:
        AutoPolicy.split = lambda self, slots, layers, experts, top_k: SlotSplit(slots - args.cache, args.cache)
    for s in args.slots:
        r = replay(s, args.tokens)
        print(f"{s} slots ({r['split'].resident} resident, {r['split'].cache} cache): hit rate {r['hit_rate']:.3f}, "
              f"missed experts per token {r['missed_experts_per_token']:.2f} (CPU {r['cpu_per_token']:.2f}, "
              f"copied {r['copied_per_token']:.2f})", flush=True)


if __name__ == "__main__":
    main()
