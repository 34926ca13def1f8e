"""Host time of an offloaded decode layer (plan, launch, join), one OffloadedExperts on a Qwen3-shaped layer set.

    PYTHONPATH=src python3 scripts/probes/host_path.py [--device cpu|cuda] [--hidden 64 --inter 32] [--layers 8]
        [--experts 128 --top-k 8] [--tokens 64] [--resident 0.25] [--policy auto,auto-prefetch] [--costs toy]
        [--profile]

Qwen3's 128 experts, top-8 by default, one token a step; routing drawn with reuse from the last token (--reuse,
the share of a token's experts of a layer that the next token picks again, as on real traces). --costs toy:
hand-made so that the planner sends some misses to the CPU and copies others; mixtral / qwen3: the H200 host's
(COSTS below), corrected on line as the engine does. Per policy (one store for all): microseconds
per layer of sync, plan, launch, join (the backend's own timers), the backend's host time in all and the wall
time. Small dims by default: the host's work, not the experts' maths. With --profile, a cProfile table.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch

from moeflow.experts.offload import OffloadedExperts
from moeflow.experts.store import ExpertStore
from moeflow.models import get_architecture
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import get_policy
from moeflow.policy.placement import even_rates, even_resident

# Measured expert costs on the H200 host (docs/history/2026-12-02.md): Mixtral's 4096 x 14336 expert, Qwen3-30B-A3B's
# 2048 x 768 (small: mostly a call's fixed part)
COSTS = {"mixtral": ExpertCosts((1, 4, 16, 64, 256), (6.5e-3, 7e-3, 9e-3, 12e-3, 45e-3), (2e-4,) * 5, 6.6e-3),
         "qwen3": ExpertCosts((1, 4, 16, 64, 256), (0.56e-3, 0.66e-3, 0.77e-3, 0.98e-3, 2.19e-3), (1.6e-4,) * 5,
                              0.25e-3, cpu_call_s=3e-5, cpu_fixed_s=0.32e-3, cpu_alone=0.75)}


def make_store(a) -> ExpertStore:
    hf = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
              moe_intermediate_size=a.inter, num_hidden_layers=a.layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_experts=a.experts, num_experts_per_tok=a.top_k,
              norm_topk_prob=True, max_position_embeddings=128)
    cfg = get_architecture("qwen3_moe").config(hf)
    store = ExpertStore(cfg, torch.bfloat16, "cpu")
    store.data.normal_(0, 0.05)
    if a.device == "cuda":
        store.pin()
    return store


def build(a, store: ExpertStore, policy: str) -> OffloadedExperts:
    pol = get_policy(policy)
    L, E, K = a.layers, a.experts, a.top_k
    slots = int(a.resident * L * E)
    split = pol.split(slots, L, E, K)
    resident = even_resident(split.resident, L, E)
    if a.costs == "toy":  # one token on the CPU about as dear as a copy: some misses go each way
        pts = (1, 4, 16, 64, 256)
        costs = ExpertCosts(pts, tuple(1e-4 * n for n in pts), tuple(2e-5 for _ in pts), 1.2e-4, cpu_call_s=2e-5)
    else:
        costs = COSTS[a.costs]
    b = OffloadedExperts(store, torch.device(a.device), pol, split, resident, costs=costs,
                         prior=even_rates(L, E, K))
    b.calibrate = a.costs != "toy"
    return b


def routing(a, g: np.random.Generator) -> list[list[np.ndarray]]:
    """Per token, per layer, K distinct experts; a share `reuse` of them the last token's."""
    E, K = a.experts, a.top_k
    out, last = [], [g.choice(E, K, replace=False) for _ in range(a.layers)]
    for _ in range(a.tokens + a.warmup):
        step = []
        for l in range(a.layers):
            keep = g.choice(last[l], int(g.binomial(K, a.reuse)), replace=False)
            rest = g.choice(np.setdiff1d(np.arange(E), keep), K - len(keep), replace=False)
            step.append(np.concatenate([keep, rest]))
        out.append(step)
        last = step
    return out


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inter", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--costs", default="toy", choices=("toy", "mixtral", "qwen3"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--resident", type=float, default=0.25)
    p.add_argument("--reuse", type=float, default=0.3)
    p.add_argument("--policy", default="auto", help="comma-separated: each in turn on one store")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    store = make_store(a)
    steps = routing(a, np.random.default_rng(0))
    for policy in a.policy.split(","):
        measure(a, build(a, store, policy), steps, policy)


def measure(a, b: OffloadedExperts, steps: list, policy: str) -> None:
    dev = torch.device(a.device)
    x = torch.randn(1, a.hidden, dtype=torch.bfloat16, device=dev)
    w = torch.full((1, a.top_k), 1 / a.top_k, dtype=torch.float32, device=dev)
    ids = [[torch.as_tensor(r, dtype=torch.long).view(1, -1).to(dev) for r in s] for s in steps]
    packed = [[b.pack(x, i, w) for i in s] for s in ids]
    dest = torch.empty_like(x)
    layers = b.host.layers

    def run(n0: int, n1: int) -> None:
        for t in range(n0, n1):
            for j, layer in enumerate(layers):
                b.run_into(layer, x, ids[t][j], w, packed[t][j], dest)

    run(0, a.warmup)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s0 = dict(b.stats.as_dict())
    prof = cProfile.Profile() if a.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    run(a.warmup, a.warmup + a.tokens)
    if prof:
        prof.disable()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    s1 = b.stats.as_dict()
    n = a.tokens * len(layers)
    keys = ("sync_s", "plan_s", "launch_s", "prefetch_s", "backend_s", "cpu_wait_s", "lookups", "hits", "cpu_experts",
            "copied_experts", "prefetched", "prefetch_used", "prefetch_wasted")
    d = {k: s1.get(k, 0) - s0.get(k, 0) for k in keys}  # main's stats lack the prefetch counts
    join = d["backend_s"] - d["sync_s"] - d["plan_s"] - d["launch_s"]
    print(f"{a.device} policy {policy}: {n} layer calls; per layer (us): sync {1e6 * d['sync_s'] / n:.1f}, "
          f"plan {1e6 * d['plan_s'] / n:.1f}, launch {1e6 * d['launch_s'] / n:.1f} (prefetch "
          f"{1e6 * d['prefetch_s'] / n:.1f}), join {1e6 * join / n:.1f}, "
          f"backend {1e6 * d['backend_s'] / n:.1f}, wall {1e6 * wall / n:.1f}")
    print(f"  per layer: hits {d['hits'] / n:.2f} of {d['lookups'] / n:.0f}, cpu {d['cpu_experts'] / n:.2f}, "
          f"copied {d['copied_experts'] / n:.2f}, prefetched {d['prefetched'] / n:.2f} (used "
          f"{d['prefetch_used'] / n:.2f}, wasted {d['prefetch_wasted'] / n:.2f})")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    b.close()


if __name__ == "__main__":
    main()
