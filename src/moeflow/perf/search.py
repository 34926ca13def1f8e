"""Policy search over the timing models (perf/model.py): the plan `moeflow plan` prints.

Latency regime: the slots the budget leaves (engine/budget.py, the engine's own accounting), which experts
stay resident (the most popular), the token count from which copying an expert beats computing it on the
CPU, and every policy's predicted figures. Throughput regime: a grid over (N, mu, attention placement, r_c)
with r_w as large as the GPU budget allows (more weights on the GPU never slows a layer), keeping only plans
that fit GPU and host memory, maximizing generated tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.engine.budget import gib, workspace_bytes
from moeflow.perf.costs import ExpertCosts
from moeflow.perf.model import LatencyPrediction, gpu_experts, predict_latency, profiled_expert_costs
from moeflow.perf.profile import HardwareProfile
from moeflow.perf.throughput_model import (ThroughputPolicy, ThroughputPrediction, layer_expert_bytes,
                                           predict_throughput, throughput_memory)
from moeflow.policy import POLICIES, get_policy

HOST_SHARE = 0.9  # of host memory the planner may use (the OS, Python and the pinned staging keep the rest)


def copy_threshold(costs: ExpertCosts, max_tokens: int = 1 << 14) -> int | None:
    """Fewest tokens routed to a missing expert from which copying it (and computing it on the GPU) is
    faster than computing it on the CPU; None if the CPU is always faster."""
    n = 1
    while n <= max_tokens:
        if costs.copy() + costs.gpu(n) < costs.cpu(n):
            lo, hi = n // 2 + 1 if n > 1 else 1, n  # the first n in (n/2, n] where copying wins
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if costs.copy() + costs.gpu(mid) < costs.cpu(mid) else (mid + 1, hi)
            return lo
        n *= 2
    return None


@dataclass
class LatencyPlan:
    name: str
    gpu_memory: int
    policy: str                      # the fastest policy predicted
    resident: list[tuple[int, int]]  # (MoE layer, expert) kept on the GPU under that policy
    copy_threshold: int | None
    predictions: dict[str, LatencyPrediction] = field(default_factory=dict)

    @property
    def best(self) -> LatencyPrediction:
        return self.predictions[self.policy]


def check_latency_fits(name: str, cfg: ModelConfig, gpu_memory: int, prompt_len: int, gen_len: int, b: int = 2,
                       expert_bytes: int | None = None):
    """MoeflowError, with the figures, when the budget does not even hold the non-expert part."""
    max_len = prompt_len + gen_len + 1
    need = cfg.dense_numel * b + cfg.kv_bytes_per_token(b) * max_len + workspace_bytes(cfg, max_len, b)
    need_one = need + cfg.num_experts_per_tok * (expert_bytes or cfg.expert_numel * b)
    if gpu_memory < need_one:
        raise MoeflowError(
            f"--gpu-memory {gib(gpu_memory)} does not fit {name}: the non-expert weights "
            f"{gib(cfg.dense_numel * b)}, KV cache and workspace need {gib(need)}, plus "
            f"{cfg.num_experts_per_tok} expert slots {gib(need_one)}: short by {gib(need_one - gpu_memory)}")


def search_latency(cfg: ModelConfig, profile: HardwareProfile, gpu_memory: int, prompt_len: int = 512,
                   gen_len: int = 128, hit_rate_or_placement=None, name: str = "model",
                   policies: tuple[str, ...] = tuple(p for p in POLICIES if POLICIES[p].modelled),
                   dtype_name: str = "bfloat16", expert_bytes: int | None = None) -> LatencyPlan:
    """expert_bytes: a quantized expert's (default: dense)."""
    b = 2 if dtype_name in ("bfloat16", "float16") else 4
    eb = expert_bytes or cfg.expert_numel * b
    check_latency_fits(name, cfg, gpu_memory, prompt_len, gen_len, b, eb)
    costs = profiled_expert_costs(profile, cfg, dtype_name, eb)
    preds = {p: predict_latency(cfg, profile, gpu_memory, p, hit_rate_or_placement, prompt_len, gen_len, name,
                                dtype_name, costs, expert_bytes=eb) for p in policies}
    ok = [p for p in preds.values() if p.error is None]
    best = max(ok, key=lambda p: p.decode_tps)
    from moeflow.engine.budget import share_budget

    max_len = prompt_len + gen_len + 1
    bud = share_budget(name, cfg, get_policy(best.policy), gpu_memory, cfg.dense_numel * b, eb,
                       cfg.kv_bytes_per_token(b) * max_len, max_len, b)
    counts = hit_rate_or_placement if not isinstance(hit_rate_or_placement, (int, float, type(None))) else None
    if counts is not None and hasattr(counts, "tolist"):
        counts = counts.tolist()
    resident = sorted((layer, e) for layer, es in enumerate(gpu_experts(cfg, bud, counts)) for e in es)
    return LatencyPlan(name, gpu_memory, best.policy, resident, copy_threshold(costs), preds)


# -- throughput regime ------------------------------------------------------------------------------------
def _grid(hi: int, ratio: float = 1.5) -> list[int]:
    out, x = [], 1.0
    while x < hi:
        out.append(int(x))
        x = max(x * ratio, x + 1)
    return sorted(set(out + [hi]))


def _max_rw(cfg, pol: ThroughputPolicy, prompt_len, gen_len, gpu_memory, b, eb: int | None = None) -> float | None:
    """The largest r_w (in steps of 1%) that fits the GPU, or None if even r_w = 0 does not (eb: an expert's
    block bytes, default dense in b)."""
    def gpu(r_w: float) -> int:
        return throughput_memory(cfg, replace(pol, r_w=r_w), prompt_len, gen_len, b, eb)[0]

    if gpu(1.0) <= gpu_memory:
        return 1.0
    g0 = gpu(0.0)
    if g0 > gpu_memory:
        return None
    slope = max(len(cfg.moe_layers) * layer_expert_bytes(cfg, b, eb), 1)  # the resident share's bytes per unit of r_w
    r = min(math.floor((gpu_memory - g0) / slope * 100) / 100, 0.99)
    while r > 0 and gpu(r) > gpu_memory:
        r -= 0.01
    return max(r, 0.0)


def search_throughput(cfg: ModelConfig, profile: HardwareProfile, gpu_memory: int, prompt_len: int, gen_len: int,
                      host_memory: int | None = None, name: str = "model", b: int = 2,
                      eb: int | None = None) -> ThroughputPrediction:
    """eb: an expert's block bytes (a quantized format's), default dense in b."""
    host = int((host_memory or profile.host_memory) * (1 if host_memory else HOST_SHARE))
    experts = len(cfg.moe_layers) * layer_expert_bytes(cfg, b, eb)
    seq_kv = (prompt_len + gen_len) * cfg.kv_bytes_per_token(b)
    if experts + seq_kv > host:
        raise MoeflowError(f"{name} does not fit host memory: its experts ({gib(experts)}) and one sequence's KV "
                           f"cache ({gib(seq_kv)}) need {gib(experts + seq_kv)}; {gib(host)} is usable "
                           f"(short by {gib(experts + seq_kv - host)})")
    smallest = ThroughputPolicy(1, 1, 0.0, 0.0, False)
    g_min = throughput_memory(cfg, smallest, prompt_len, gen_len, b, eb)[0]
    if g_min > gpu_memory:
        raise MoeflowError(f"--gpu-memory {gib(gpu_memory)} does not fit {name} in the throughput regime: the "
                           f"non-expert weights ({gib(cfg.dense_numel * b)}), two buffers of one layer's "
                           f"experts and the workspace need {gib(g_min)} (short by {gib(g_min - gpu_memory)})")
    n_max = max(1, (host - experts) // seq_kv)
    best = None
    for N in _grid(n_max):
        # At least two micro-batches, so that CPU attention, copies and GPU work can overlap (CGOPipe).
        top = max(1, -(-N // 2))
        for mu in sorted({min(2**i, top) for i in range(int(math.log2(top)) + 2)}):
            for attn_gpu in (False, True):
                for r_c in ([0.0] if not attn_gpu else [i / 4 for i in range(5)]):
                    pol = ThroughputPolicy(N, mu, 0.0, r_c, attn_gpu)
                    if throughput_memory(cfg, pol, prompt_len, gen_len, b, eb)[1] > host:
                        continue
                    r_w = _max_rw(cfg, pol, prompt_len, gen_len, gpu_memory, b, eb)
                    if r_w is None:
                        continue
                    pred = predict_throughput(cfg, profile, replace(pol, r_w=r_w), prompt_len, gen_len, b, eb=eb)
                    if best is None or pred.tokens_per_s > best.tokens_per_s:
                        best = pred
    if best is None:
        raise MoeflowError(f"no throughput plan fits {gib(gpu_memory)} of GPU and {gib(host)} of host memory")
    return best
