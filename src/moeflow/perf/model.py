"""Per-layer timing models of the two regimes, as pure functions of (ModelConfig, HardwareProfile, budget,
workload): what `moeflow plan` predicts and `bench latency` sets beside its measurements.

Latency regime (one request; experts/offload.py): a layer runs its non-expert part on the GPU, then the routed
experts: those in a GPU slot on the GPU, the missing ones as the policy plans them (policy/*.py, the same
code): on the CPU, copied in, or split. The CPU, the copy engine and the GPU overlap; the GPU computes a
copied expert once it lands. Layer time = non-expert GPU time + max(CPU work, copies then their GPU work,
GPU work on hits) + the host-side overhead of an offloaded layer (sync, planning, launches).
Expected misses come from a hit rate, or from a popularity profile (counts [L, E] as in policy/placement.py):
resident experts are the most popular; in decode, cached slots are counted as holding each layer's next most
popular experts (an optimistic steady state); in prefill resident experts hit, and so do as many of each
layer's other experts as its share of the cache slots holds (a warm engine: every expert of every layer is
used, so the cache holds whichever came last; `bench latency` times TTFT after a warm-up request).

Throughput regime: perf/throughput_model.py.

Legend: L = MoE layers, E = experts, K = experts per token, H = hidden, I = expert FFN width, P = prompt
tokens, G = generated tokens, b = bytes per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moeflow.config import ModelConfig
from moeflow.engine.budget import Budget, pass_entries_per_token, share_budget
from moeflow.perf.costs import ExpertCosts
from moeflow.perf.profile import PREFILL_K, HardwareProfile
from moeflow.perf.prompt_shape import PromptShape  # noqa: F401  (the prefill_shape it is given)
from moeflow.policy import get_policy
from moeflow.policy.placement import even_resident

RESOURCES = ("CPU memory bus", "PCIe", "GPU", "host overhead")


# -- latency regime ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerTime:
    cpu: float     # CPU expert work (memory-bound at small batches)
    copy: float    # host -> GPU copies of expert weights
    gpu: float     # non-expert part + expert compute on the GPU
    overhead: float
    total: float

    def scaled(self, w: float) -> LayerTime:
        return LayerTime(*(getattr(self, k) * w for k in ("cpu", "copy", "gpu", "overhead", "total")))

    def __add__(self, o: LayerTime) -> LayerTime:
        return LayerTime(*(getattr(self, k) + getattr(o, k) for k in ("cpu", "copy", "gpu", "overhead", "total")))


ZERO = LayerTime(0.0, 0.0, 0.0, 0.0, 0.0)


def layer_time(policy, costs: ExpertCosts, inter: int, misses: dict[int, int], hit_tokens: list[int],
               max_copies: int, dense_s: float, overhead_s: float, link_latency_s: float = 0.0,
               tokens: int = 1, host_s: float = 0.0, per_token: float = 1.0) -> LayerTime:
    """One MoE layer of a step of `tokens` tokens: misses expert -> tokens (not on the GPU), hit_tokens the
    tokens of each expert that is; per_token: routing entries per token a grouped pass holds (the step's
    workspace, engine/budget.py pass_entries_per_token). host_s: the host's own time in the layer beyond
    overhead_s (a prefill's eager launches, its routing's bookkeeping and grouped passes). It runs beside
    neither the CPU's share (the host waits for that before it launches the rest of the layer and the next one)
    nor the copies (a prefill's measured time is the copies' plus its host time, not their overlap). The host
    also launches the copies one by one (beside the copy engine and the CPU). Copies with no CPU work beside
    them cross at their own rate (copy_alone_s)."""
    rows = policy.plan(misses, costs, inter, max_copies) if misses else {}
    on_cpu = [e for e, r in rows.items() if r > 0]
    cpu = costs.cpu_work([(misses[e], rows[e] / inter) for e in on_cpu], any(r < inter for r in rows.values()))
    if on_cpu:
        cpu += costs.cpu_call_s + 2 * link_latency_s  # hand-off, activations there and back
    # the experts already there in one wave; the copied ones in waves of as many as there are slots for them,
    # each once its copies have landed (copies start once the routing is known, after the non-expert part)
    gpu_end = gpu_work = dense_s + costs.gpu_wave([(n, 1.0) for n in hit_tokens], tokens, per_token)
    copy_end, wave = dense_s, []
    copied = [(misses[e], (inter - r) / inter) for e, r in rows.items() if r < inter]
    for i, (n, f) in enumerate(copied):
        copy_end += costs.copy(f, alone=not on_cpu)
        wave.append((n, f))
        if len(wave) == max(max_copies, 1) or i == len(copied) - 1:
            g = costs.gpu_wave(wave, tokens, per_token)
            gpu_end, gpu_work, wave = max(gpu_end, copy_end) + g, gpu_work + g, []
    launches = len(copied) * costs.copy_launch_s
    total = max(dense_s + cpu, gpu_end, launches) + host_s + overhead_s
    return LayerTime(cpu, copy_end - dense_s, gpu_work, overhead_s + host_s, total)


def _binom(k: int, n: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def _top_mass(shares: list[float], n: float) -> float:
    """Popularity mass of the n most popular experts of a layer (n may be fractional)."""
    s = sorted(shares, reverse=True)
    whole = min(int(n), len(s))
    return sum(s[:whole]) + (s[whole] * (n - whole) if whole < len(s) else 0.0)


def gpu_experts(cfg: ModelConfig, budget: Budget, counts=None) -> list[set[int]]:
    """Resident experts per MoE layer: the most popular overall (Placement.resident), else an even split."""
    L, E = len(cfg.moe_layers), cfg.num_experts
    n = min(budget.split.resident, L * E)
    if counts is None:
        keys = even_resident(n, L, E)
    else:
        flat = [(-float(counts[i // E][i % E]), i) for i in range(L * E)]
        keys = [(i // E, i % E) for _, i in sorted(flat)[:n]]
    out = [set() for _ in range(L)]
    for layer, e in keys:
        out[layer].add(e)
    return out


def _shares(cfg: ModelConfig, counts, layer: int) -> list[float]:
    E = cfg.num_experts
    if counts is None:
        return [1 / E] * E
    row = [float(c) for c in counts[layer]]
    total = sum(row)
    return [c / total for c in row] if total else [1 / E] * E


@dataclass(frozen=True)
class LatencyPrediction:
    policy: str
    decode_tps: float = 0.0
    ttft_s: float = 0.0
    hit_rate: float = 0.0            # decode, expected
    token: LayerTime = ZERO          # one decode token, summed over layers
    binding: str = ""                # the resource with the largest share of a decode token's time
    bound_tps: float = 0.0           # misses over CPU bus + PCIe at once, plus the GPU's own time
    budget: dict = field(default_factory=dict)
    error: str | None = None         # the policy cannot run at this budget

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("policy", "decode_tps", "ttft_s", "hit_rate", "binding", "bound_tps",
                                           "budget", "error")}
        return d | {"token_" + k: getattr(self.token, k) for k in ("cpu", "copy", "gpu", "overhead", "total")}


def binding_of(t: LayerTime) -> str:
    terms = {"CPU memory bus": t.cpu, "PCIe": t.copy, "GPU": t.gpu, "host overhead": t.overhead}
    return max(terms, key=terms.get)


def dense_gpu_s(cfg: ModelConfig, profile: HardwareProfile, layer: int, tokens: int, ctx: int, b: int,
                causal_prefill: bool = False) -> float:
    """Non-expert part of one layer on the GPU: its weights read once, its FLOPs, and attention over the KV."""
    numel = cfg.layer_dense_numel(layer)
    kv_layer = cfg.kv_bytes_per_token(b) // cfg.num_hidden_layers  # one token's cache in one layer (MLA: latent)
    attn_flops = 4 * cfg.num_attention_heads * cfg.head_dim * (tokens * tokens / 2 if causal_prefill else tokens * ctx)
    nbytes = numel * b + kv_layer * ctx
    return max(nbytes / profile.gpu_bw, (2 * tokens * numel + attn_flops) / profile.gpu_flops)


def host_read_bw(profile: HardwareProfile) -> float:
    """Bytes/s host memory gives the CPU's expert reads and the copies to the GPU together."""
    return profile.host_read_bw_shared or profile.cpu_read_bw + profile.h2d_bw


def prefill_host_s(profile: HardwareProfile, tokens: int, top_k: int = PREFILL_K) -> float:
    """The host's time in an offloaded layer of a `tokens`-token prefill with `top_k` experts per token beyond a
    decode layer's: piecewise linear in the layer's routing entries (tokens x top_k) between the prompts
    measured, the last piece extended. A decode step is one graph; a prefill's launches are eager, and the
    routing's bookkeeping and the GPU's grouped passes grow with the entries (Qwen3's 8 per token take ~4x
    Mixtral's 2 per token)."""
    if len(profile.prefill_overhead_s) != len(profile.prefill_tokens) or tokens <= 1:
        return 0.0
    pts = ((PREFILL_K, profile.layer_overhead_s),) + \
        tuple((n * PREFILL_K, t) for n, t in zip(profile.prefill_tokens, profile.prefill_overhead_s))
    x = tokens * top_k
    i = next((i for i in range(1, len(pts)) if x <= pts[i][0]), len(pts) - 1)
    (a, ta), (b, tb) = pts[i - 1], pts[i]
    return max(ta + (tb - ta) * (x - a) / (b - a) - profile.layer_overhead_s, 0.0)


def head_gpu_s(cfg: ModelConfig, profile: HardwareProfile, b: int) -> float:
    return cfg.vocab_size * cfg.hidden_size * b / profile.gpu_bw


def profiled_expert_costs(profile: HardwareProfile, cfg: ModelConfig, dtype_name: str, expert_bytes: int
                          ) -> ExpertCosts:
    """The profile's expert costs; a quantized expert's copy scaled to its bytes (its CPU and GPU times are the
    dense kernels': the profile does not time the quantized ones)."""
    costs = profile.expert_costs(cfg, dtype_name)
    dense = cfg.expert_numel * (2 if dtype_name in ("bfloat16", "float16") else 4)
    if expert_bytes == dense:
        return costs
    return replace(costs, copy_s=costs.copy_s * expert_bytes / dense)


@dataclass(frozen=True)
class _Run:
    """What every layer of a latency prediction shares: the policy, costs, slots and the host's times."""

    pol: object
    costs: ExpertCosts
    I: int
    K: int
    b: int
    max_copies: int
    lat: float                 # the link's latency
    per_layer_cache: float     # cache slots per layer (0: copies are not kept)
    per_token: int             # grouped-pass entries per token (engine/budget.py)
    decode_host: float         # the host's share of a decode layer
    layer_host: float          # ... and of a prefill layer, then its growth with the prompt
    prefill_host: float
    resident_dense: float      # a resident decode layer's non-expert floor


def predict_latency(cfg: ModelConfig, profile: HardwareProfile, budget: int, policy: str,
                    hit_rate_or_placement=None, prompt_len: int = 512, gen_len: int = 128, name: str = "model",
                    dtype_name: str = "bfloat16", costs: ExpertCosts | None = None,
                    prefill_hit: float | None = None, prefill_used: float | None = None,
                    prefill_shape: list[float] | None = None, host_speed: float = 1.0,
                    expert_bytes: int | None = None) -> LatencyPrediction:
    """Decode tok/s and TTFT of one request under `policy` with a GPU budget of `budget` bytes.

    hit_rate_or_placement: None (derived from the slots, uniform routing), a float (the share of decode
    lookups found on the GPU, as measured), or counts [L, E] (a placement's popularity profile).
    prefill_hit, prefill_used: the share of the prompt's experts found on the GPU and how many experts a layer
    used, as measured (default: derived from the slots; every expert): a router that sends a prompt to few
    experts, which the slots hold, leaves fewer to move. prefill_shape: the prompt's tokens per expert in a
    layer, from the most used down (PromptShape, as measured): a skewed prompt leaves some experts few tokens.
    host_speed: the host's time now over its time at the profile (perf/probe.py): the host's share of a layer
    and of a step take that many times the profile's. expert_bytes: a quantized expert's (default: dense in b)."""
    from moeflow import MoeflowError

    b = 2 if dtype_name in ("bfloat16", "float16") else 4
    eb = expert_bytes or cfg.expert_numel * b
    pol = get_policy(policy)
    L, K = len(cfg.moe_layers), cfg.num_experts_per_tok
    max_len = prompt_len + gen_len + 1
    try:
        bud = share_budget(name, cfg, pol, budget, cfg.dense_numel * b, eb,
                           cfg.kv_bytes_per_token(b) * max_len, max_len, b)
    except MoeflowError as e:
        return LatencyPrediction(policy, error=str(e))
    run = _run(cfg, profile, pol, bud, b, eb, dtype_name, costs, prompt_len, host_speed)
    counts = hit_rate_or_placement if isinstance(hit_rate_or_placement, (list, tuple)) or \
        hasattr(hit_rate_or_placement, "tolist") else None
    if counts is not None and hasattr(counts, "tolist"):
        counts = counts.tolist()
    fixed_hit = hit_rate_or_placement if isinstance(hit_rate_or_placement, (int, float)) else None
    resident = gpu_experts(cfg, bud, counts)
    ctx = prompt_len + gen_len // 2
    shape = scale = None
    if prefill_shape:
        # the shape's ranks averaged over layers have a tail of fractions (an expert ranked 40th in some layers
        # only): the measured experts per layer take the tokens, else rounding would count that tail as experts
        # used (Qwen3: ~49 per layer where 29 were)
        shape = prefill_shape[:max(round(prefill_used), 1)] if prefill_used else prefill_shape
        scale = prompt_len * K / (sum(shape) or 1.0)

    token, ttft, hits = ZERO, 0.0, 0.0
    for li, layer in enumerate(cfg.moe_layers):
        shares, res = _shares(cfg, counts, li), resident[li]
        h = _layer_hit(run, fixed_hit, shares, res)
        hits += h / L
        token = token + _decode_layer(run, h, max(dense_gpu_s(cfg, profile, layer, 1, ctx, b), run.resident_dense))
        n_tok = _prompt_tokens(shares, prompt_len, K, shape, scale, prefill_used)
        dense = dense_gpu_s(cfg, profile, layer, prompt_len, prompt_len, b, causal_prefill=True)
        ttft += _prefill_layer(run, n_tok, res, prefill_hit, dense, prompt_len)
    for layer in cfg.dense_layers:
        d = dense_gpu_s(cfg, profile, layer, 1, ctx, b)
        token = token + LayerTime(0, 0, d, 0, d)
        ttft += dense_gpu_s(cfg, profile, layer, prompt_len, prompt_len, b, causal_prefill=True)
    head, step_host = head_gpu_s(cfg, profile, b), profile.step_overhead_s * host_speed
    # the head on the GPU, and the step's own host work (sampling, its bookkeeping), one after the other
    token = token + LayerTime(0, 0, head, step_host, head + step_host)
    ttft += head
    return LatencyPrediction(policy, 1 / token.total, ttft, hits, token, binding_of(token),
                             _bound_tps(cfg, profile, hits, eb, b), bud.as_dict())


def _run(cfg: ModelConfig, profile: HardwareProfile, pol, bud: Budget, b: int, eb: int, dtype_name: str,
         costs: ExpertCosts | None, prompt_len: int, host_speed: float) -> _Run:
    K, L = cfg.num_experts_per_tok, len(cfg.moe_layers)
    costs = (costs or profiled_expert_costs(profile, cfg, dtype_name, eb)).with_rates(
        eb, profile.gpu_bw, profile.cpu_read_bw, profile.h2d_bw)
    # a decode layer with its experts on the GPU, as measured on this machine, leaves the non-expert part what
    # the host's share and the experts' wave do not take of it (at least its roofline); at the profile's speed.
    # The profile timed that layer with dense experts: the wave taken out is theirs, whatever this run's are.
    resident_dense = profile.resident_layer(cfg, dtype_name) - profile.decode_layer_s(K) - \
        profile.expert_costs(cfg, dtype_name).gpu_wave([(1, 1.0)] * K)
    split = bud.split
    max_copies = max(int(split.cache // L if split.per_layer else split.cache), 1 if split.cache else 0)
    return _Run(pol, costs, cfg.expert_intermediate_size, K, b, max_copies, profile.h2d_latency_s,
                (split.cache / L) if split.keep_copies else 0.0, pass_entries_per_token(cfg, b),
                profile.decode_layer_s(K) * host_speed, profile.layer_overhead_s * host_speed,
                prefill_host_s(profile, prompt_len, K) * host_speed, resident_dense)


def _layer_hit(run: _Run, fixed_hit: float | None, shares: list[float], res) -> float:
    """A decode lookup's chance to find its expert on the GPU: the policy's, measured, or the resident experts'
    share of the routing plus the cache's share of the most used others."""
    if run.pol.gpu_share is not None:
        return run.pol.gpu_share
    if fixed_hit is not None:
        return float(fixed_hit)
    return min(sum(shares[e] for e in res) + _top_mass([s for e, s in enumerate(shares) if e not in res],
                                                       run.per_layer_cache), 1.0)


def _decode_layer(run: _Run, h: float, dense: float) -> LayerTime:
    """A decode layer's expected time: K experts, each missing with probability 1 - h (one token each)."""
    t_sum = ZERO
    for m in range(run.K + 1):
        p = _binom(m, run.K, 1 - h)
        if p < 1e-9:
            continue
        t = layer_time(run.pol, run.costs, run.I, {e: 1 for e in range(m)}, [1] * (run.K - m), run.max_copies,
                       dense, run.decode_host, run.lat)
        t_sum = t_sum + t.scaled(p)
    return t_sum


def _prompt_tokens(shares: list[float], prompt_len: int, K: int, shape, scale, prefill_used) -> dict[int, int]:
    """A prompt's tokens per expert of a layer: every expert its share of the P*K selections, or, measured,
    the prompt's tokens per expert (shape, from the most used down) given to the experts by popularity."""
    by_share = sorted(range(len(shares)), key=lambda e: -shares[e])
    if shape:
        return dict.fromkeys(range(len(shares)), 0) | {e: round(c * scale) for e, c in zip(by_share, shape)}
    top = by_share[:max(round(prefill_used), 1)] if prefill_used else by_share
    mass = sum(shares[e] for e in top) or 1.0
    return {e: round(prompt_len * K * shares[e] / mass) if e in top else 0 for e in range(len(shares))}


def _prefill_layer(run: _Run, n_tok: dict[int, int], res, prefill_hit: float | None, dense: float,
                   prompt_len: int) -> float:
    """A prefill layer's time: the GPU holds the layer's resident experts and, in its share of the cache slots c,
    floor(c) of its most used others or one more with probability c - floor(c); or, measured, the share
    prefill_hit of the experts used."""
    used = sorted((e for e, n in n_tok.items() if n), key=lambda e: (e not in res, -n_tok[e]))
    held = sum(e in res for e in used) + run.per_layer_cache if prefill_hit is None else prefill_hit * len(used)
    lo, t = int(held), 0.0
    for k, w in ((lo, 1 - (held - lo)), (lo + 1, held - lo)):
        if w <= 0:
            continue
        there = {1.0: set(n_tok), 0.0: set()}.get(run.pol.gpu_share, set(used[:k]))
        misses = {e: n for e, n in n_tok.items() if n and e not in there}
        hit_tokens = [n for e, n in n_tok.items() if n and e in there]
        t += w * layer_time(run.pol, run.costs, run.I, misses, hit_tokens, run.max_copies, dense, run.layer_host,
                            run.lat, prompt_len, run.prefill_host, run.per_token).total
    return t


def _bound_tps(cfg: ModelConfig, profile: HardwareProfile, hits: float, eb: int, b: int) -> float:
    """The bound: the missed weights cross the CPU's bus and PCIe at once, at the rate the two get together
    (they share host memory) where the profile measured it; the GPU reads what it holds."""
    L, K = len(cfg.moe_layers), cfg.num_experts_per_tok
    miss_bytes = (1 - hits) * L * K * eb
    gpu_s = (cfg.dense_numel - cfg.vocab_size * cfg.hidden_size) * b / profile.gpu_bw + \
        hits * L * K * eb / profile.gpu_bw
    return 1 / (miss_bytes / host_read_bw(profile) + gpu_s)
