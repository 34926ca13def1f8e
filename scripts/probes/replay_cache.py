"""Expert bytes moved per decode token by the real engine (the CPU as both tiers) replaying a recorded routing
trace on a tiny model of the trace's routing shape (Mixtral: 32 MoE layers, 8 experts, top-2; DeepSeek-V2-Lite:
26, 64, top-6), for given numbers of expert slots: how a slot split or caching rule changes the misses, without
a GPU. The popularity profile comes from the trace's first --profile share of tokens and the replay from the
rest, so residency is judged on routing it was not made from.

  python scripts/probes/replay_cache.py 62 220 --trace .carry/data/mixtral-8x7b-instruct.humaneval.jsonl
  python scripts/probes/replay_cache.py 100 400 --trace ../shared/data/traces/deepseek-v2-lite-chat.dev.npz
      [--static] [--no-whole] [--no-keep] [--cache N] [--half-life H] [--tokens T] [--costs mixtral|qwen3]
      (from the repo root, PYTHONPATH=src)

--static: auto's resident slots fixed and its cache under LRU (as before they adapted); --no-whole: the planner
splits the boundary expert even where a whole one costs at most 5% more; --no-keep: also one the cache would
keep (auto copies it whole at up to 25% more); --cache N: N cache slots, the rest
resident. docs/benchmarks.md (2026-12-02) compares --static --no-whole, --no-whole and the default."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from moeflow import synthetic
from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.budget import step_workspace
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.trace import RoutingTrace, TraceRouting, load_trace
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import eviction
from moeflow.policy import auto
from moeflow.policy.auto import AutoPolicy
from moeflow.policy.placement import Placement

# the H200 host's costs (docs/benchmarks.md, 2026-12-01): CPU expert beside copies, copy, GPU expert
COSTS = {"mixtral": ExpertCosts((1, 4, 16, 64, 256), (6.5e-3, 7e-3, 9e-3, 12e-3, 45e-3), (2e-4,) * 5, 6.6e-3),
         # Qwen3-30B-A3B's expert (2048 x 768) on the H200 host, 2026-12-02 05:40: small, mostly a call's fixed part
         "qwen3": ExpertCosts((1, 4, 16, 64, 256), (0.56e-3, 0.66e-3, 0.77e-3, 0.98e-3, 2.19e-3), (1.6e-4,) * 5,
                              0.25e-3, cpu_call_s=3e-5, cpu_fixed_s=0.32e-3, cpu_alone=0.75)}
TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def preset(trace: RoutingTrace) -> str:
    """A tiny synthetic model with the trace's MoE layers, experts and top-k."""
    T, L, K = trace.shape
    E = int(trace.ids.max()) + 1
    E = 8 if E <= 8 else 64 if E <= 64 else E
    name = f"trace-{L}x{E}x{K}"
    base = dict(synthetic.PRESETS["tiny-mixtral"], **TINY) if E == 8 else dict(
        synthetic.PRESETS["tiny-qwen3"], **TINY, moe_intermediate_size=64, head_dim=16)
    synthetic.PRESETS[name] = dict(base, num_hidden_layers=L, num_experts_per_tok=K,
                                   **({"num_local_experts": E} if E == 8 else {"num_experts": E}))
    return f"synthetic:{name}"


def replay(trace_path: str, slots: int, tokens: int, profile: float, costs: ExpertCosts, max_len: int = 64,
           policy: str = "auto") -> dict:
    trace = load_trace(trace_path)
    T = trace.shape[0]
    t0 = int(T * profile)
    head, tail = (RoutingTrace(trace.ids[a:b], None if trace.weights is None else trace.weights[a:b], trace.name)
                  for a, b in ((0, t0), (t0, T)))
    ck = load(preset(trace), device="cpu", expert_device="cpu", dtype="fp32")
    placement = Placement(ck.name, head.counts(ck.cfg.num_experts))
    kv = ck.cfg.kv_bytes_per_token(ck.store.data.dtype) * max_len
    budget = ck.dense_bytes + kv + step_workspace(ck.cfg, kv, max_len, 4) + slots * ck.store.expert_bytes
    with tempfile.TemporaryDirectory() as d:
        placement.save(Path(d) / "placement.json")
        engine = LLMEngine(ck, max_seqs=1, max_len=max_len,
                           offload=OffloadConfig(budget, policy, str(Path(d) / "placement.json")))
    backend = engine.model.experts
    backend.costs, backend.calibrate = costs, False
    ck.model.set_experts(TraceRouting(backend, tail, ck.cfg))
    stats, n = None, 0
    while n < tokens:  # sequences of max_len tokens in turn, walking the trace's tail
        seq = engine.add_request([5], SamplingParams(max_new_tokens=min(max_len - 2, tokens - n + 1),
                                                     ignore_eos=True))
        engine.step()  # prefill of one token
        if stats is None:
            stats = backend.stats.as_dict()
        while not seq.finished:
            engine.step()
            n += 1
    d = {k: v - stats[k] for k, v in backend.stats.as_dict().items() if k != "hit_rate"}
    backend.close()
    return {"slots": slots, "split": backend.split, "hit_rate": d["hits"] / d["lookups"],
            "missed_experts_per_token": d["miss_bytes"] / ck.store.expert_bytes / n,
            "cpu_per_token": d["cpu_experts"] / n, "copied_per_token": d["copied_experts"] / n,
            "prefetch_per_token": {k: d[k] / n for k in ("prefetched", "prefetch_used", "prefetch_wasted")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slots", type=int, nargs="+")
    p.add_argument("--trace", default=".carry/data/mixtral-8x7b-instruct.humaneval.jsonl")
    p.add_argument("--profile", type=float, default=0.5, help="share of the trace that makes the profile")
    p.add_argument("--static", action="store_true", help="resident slots fixed, the cache under LRU")
    p.add_argument("--no-whole", action="store_true", help="always split the boundary expert")
    p.add_argument("--cache", type=int, help="cache slots instead of auto's own split")
    p.add_argument("--half-life", type=float, help="of the decayed-use eviction, in tokens")
    p.add_argument("--tokens", type=int, default=299)
    p.add_argument("--costs", choices=sorted(COSTS), default="mixtral", help="the expert costs the planner takes")
    p.add_argument("--policy", default="auto", help="auto or auto-prefetch (or fmoe)")
    p.add_argument("--no-keep", action="store_true", help="split a miss the cache would keep, as any other")
    args = p.parse_args()
    own = AutoPolicy.split

    def split(self, slots, layers, experts, top_k):
        s = own(self, slots, layers, experts, top_k)
        if args.cache is not None:
            s = dataclasses.replace(s, resident=slots - args.cache, cache=args.cache)
        return dataclasses.replace(s, adaptive=s.adaptive and not args.static)

    AutoPolicy.split = split
    if args.static:
        AutoPolicy.eviction = "lru"
    if args.no_whole:
        auto.WHOLE_SLACK = -1.0
    if args.no_keep:
        auto.KEEP_SLACK = auto.WHOLE_SLACK
    if args.half_life:
        eviction.HALF_LIFE = args.half_life
    for s in args.slots:
        r = replay(args.trace, s, args.tokens, args.profile, COSTS[args.costs], policy=args.policy)
        print(f"{s} slots ({r['split'].resident} resident, {r['split'].cache} cache, adaptive "
              f"{r['split'].adaptive}): hit rate {r['hit_rate']:.3f}, missed experts per token "
              f"{r['missed_experts_per_token']:.2f} (CPU {r['cpu_per_token']:.2f}, copied "
              f"{r['copied_per_token']:.2f}); prefetch per token {r['prefetch_per_token']}", flush=True)


if __name__ == "__main__":
    main()
