"""The throughput regime's timing model (MoE-Lightning's CGOPipe, arXiv 2411.11217), what the pipeline engine
(pipeline/*) plans with: per layer T = max(T_h2d, T_d2h, T_cpu, T_gpu, T_host, and the CPU's attention followed by
the last micro-batch's GPU share) for a batch of N sequences in micro-batches of mu, a fraction r_w of the
expert weights and r_c of the KV cache on the GPU, attention on the CPU (KV in host memory, Q/K/V cross PCIe)
or on the GPU; the prefill in rounds of chunks.

Legend: L = MoE layers, E = experts, K = experts per token, H = hidden, I = expert FFN width, N = sequences,
mu = micro-batch, b = bytes per weight (dense weights, activations, KV), eb = bytes of one expert's block (a
quantized format's; default dense in b).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moeflow.config import ModelConfig
from moeflow.perf.profile import HardwareProfile


# -- throughput regime ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThroughputPolicy:
    N: int              # sequences in the batch
    mu: int             # micro-batch
    r_w: float          # fraction of the expert weights on the GPU
    r_c: float          # fraction of the KV cache on the GPU (0 with attention on the CPU)
    attn_gpu: bool      # attention on the GPU (else on the CPU over a host KV cache)


@dataclass(frozen=True)
class PipelineRates:
    """The pipeline's own kernels on this host, timed at plan time (the defaults: the profile's figures)."""
    attn_bw: float | None = None        # CPU decode attention's K/V read rate alone (None: the memory bus's)
    attn_call_s: float = 0.0            # the fixed part of a micro-batch's attention call
    prefill_flops: float | None = None  # a prefill pass's grouped expert calls, their weight reads included


@dataclass(frozen=True)
class ThroughputPrediction:
    policy: ThroughputPolicy
    tokens_per_s: float   # generated tokens over prefill + decode time
    decode_tps: float     # generated tokens per second of decode alone
    prefill_s: float
    layer_s: float        # one decode layer
    terms: dict           # resource -> seconds of one decode layer
    binding: str
    gpu_bytes: int
    host_bytes: int
    rates: PipelineRates | None = None  # the measured rates it used

    def as_dict(self) -> dict:
        return {"N": self.policy.N, "mu": self.policy.mu, "r_w": self.policy.r_w, "r_c": self.policy.r_c,
                "attention": "gpu" if self.policy.attn_gpu else "cpu", "tokens_per_s": self.tokens_per_s,
                "decode_tps": self.decode_tps, "prefill_s": self.prefill_s, "layer_s": self.layer_s,
                "binding": self.binding, "gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes,
                "rates": asdict(self.rates) if self.rates else None} | {"T_" + k: v for k, v in self.terms.items()}


PREFILL_CHUNK = 8192  # prompt tokens per prefill pass through a layer
PREFILL_GROUP = 8 * PREFILL_CHUNK  # prompt tokens per prefill round: a layer's weights stream once per round
LOGITS_ROWS = 256  # sequences whose logits are computed and sampled at once
STAGED = 4  # a prefill's K/V copies to the host in flight at once (pinned staging, pipeline/engine.py)


def cpu_attention_shape(cfg: ModelConfig) -> tuple[int, int, int, bool]:
    """The CPU's decode attention: (query heads, KV heads, head dim, K and V one row): the model's heads, or for
    latent attention (MLA) one KV head of [latent | rope key] rows read as keys and values (pipeline/attention.py)."""
    if cfg.kv_lora_rank:
        return cfg.num_attention_heads, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, True
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, False


def attended(cfg: ModelConfig, ctx: float) -> float:
    """Positions a decode step's attention reads in a layer, averaged over the layers: ctx, or the layer's
    sliding window where shorter (GPT-OSS alternates windowed and full layers)."""
    windows = cfg.layer_windows or [cfg.sliding_window] * cfg.num_hidden_layers
    return sum(min(ctx, w) if w else ctx for w in windows) / len(windows)


def layer_expert_bytes(cfg: ModelConfig, b: int, eb: int | None = None) -> int:
    """One MoE layer's experts in bytes: blocks of eb bytes, else dense in b."""
    return cfg.num_experts * (eb or cfg.expert_numel * b)


def throughput_memory(cfg: ModelConfig, pol: ThroughputPolicy, prompt_len: int, gen_len: int,
                      b: int = 2, eb: int | None = None) -> tuple[int, int]:
    """(GPU bytes, host bytes) the policy needs. Host: every expert, the host share of a KV cache of N runs of
    prompt_len + gen_len positions (pipeline/kv.py allocates exactly that) and the staging buffers."""
    from moeflow.engine.budget import workspace_bytes

    L, w_layer = len(cfg.moe_layers), layer_expert_bytes(cfg, b, eb)
    kv = pol.N * (prompt_len + gen_len) * cfg.kv_bytes_per_token(b)
    # the double buffer: each holds a whole layer (the resident experts copied in beside the streamed ones, as the
    # grouped and quantized kernels take one [E, W] tensor, pipeline/weights.py)
    stream = 0 if pol.r_w >= 1 else 2 * w_layer
    kv_stage = 0 if (not pol.attn_gpu or pol.r_c >= 1) else \
        2 * pol.N * (prompt_len + gen_len) * cfg.kv_bytes_per_token(b) // cfg.num_hidden_layers
    step = max(pol.N, min(pol.N * prompt_len, PREFILL_CHUNK))  # decode holds all N, logits included
    hidden = min(pol.N * prompt_len, PREFILL_GROUP) * cfg.hidden_size * b  # a prefill round's hidden states
    hidden += min(pol.N, LOGITS_ROWS) * cfg.vocab_size * (b + 4)              # logits, and in fp32
    gpu = cfg.dense_numel * b + int(pol.r_w * L * w_layer) + int(pol.r_c * kv) + stream + kv_stage + \
        workspace_bytes(cfg, step, b) + hidden + grouped_call_excess(cfg, step, b)
    host = L * w_layer + int((1 - pol.r_c) * kv) + host_staging_bytes(cfg, pol.N, prompt_len, b)
    return gpu, host


def grouped_call_excess(cfg: ModelConfig, step: int, b: int) -> int:
    """GPU bytes a pipeline's grouped expert call holds beyond what the workspace counts for a step of `step`
    tokens: a call takes up to grouped_call_tokens tokens with all their routing entries (Qwen3-30B-A3B: 8 a
    token, where the workspace counts 4.5)."""
    from moeflow.engine.budget import pass_entries_per_token, pass_entry_bytes
    from moeflow.pipeline.weights import grouped_call_tokens

    K = cfg.num_experts_per_tok
    entries = min(step, grouped_call_tokens(cfg.expert_intermediate_size, K, b)) * K
    return max(0, entries - int(pass_entries_per_token(cfg, b) * step)) * pass_entry_bytes(cfg, b)


def host_staging_bytes(cfg: ModelConfig, n: int, prompt_len: int, b: int = 2) -> int:
    """Host buffers beside the KV cache: one decode layer's q/k/v in and attention out for n sequences (pinned,
    fp32 at most), one prefill pass's K/V on their way to the cache, a few fp32 logits rows being sampled."""
    heads, kv_heads, D, _ = cpu_attention_shape(cfg)
    decode = n * (2 * heads + 2 * kv_heads) * D * 4 * 2       # the layer's buffers and the kernel's fp32 copies
    prefill = min(n * prompt_len, PREFILL_CHUNK) * kv_heads * D * b * STAGED  # K or V of a pass, in flight
    return decode + prefill + 4 * cfg.vocab_size * 4


def shared_rates(profile: HardwareProfile) -> tuple[float, float]:
    """(CPU reads, host -> GPU copies) in bytes/s while both run: the copies at their rate measured beside CPU
    reads (else alone), the CPU the rest of what host memory gives both (else its own rate)."""
    h2d = profile.h2d_bw_shared or profile.h2d_bw
    cpu = profile.host_read_bw_shared - h2d if profile.host_read_bw_shared > h2d else profile.cpu_read_bw
    return min(cpu, profile.cpu_read_bw), min(h2d, profile.h2d_bw)


def copy_beside(nbytes: float, alone: float, beside: float, overlap_s: float) -> float:
    """Seconds to copy nbytes at `beside` bytes/s for the first overlap_s seconds (CPU reads run), then alone."""
    if nbytes <= beside * overlap_s:
        return nbytes / beside
    return overlap_s + (nbytes - beside * overlap_s) / alone


def expert_gpu_flops(cfg: ModelConfig, profile: HardwareProfile, b: int) -> float:
    """The GPU's FLOP/s on cfg's experts at the most tokens the profile timed them with (else the matmul rate)."""
    d = profile.experts.get(f"{cfg.hidden_size}x{cfg.expert_intermediate_size}:"
                            f"{'float32' if b == 4 else 'bfloat16'}")
    if not d or not d.get("gpu_s") or d["gpu_s"][-1] <= 0:
        return profile.gpu_flops
    flops = 6 * cfg.hidden_size * cfg.expert_intermediate_size * d["tokens"][-1] / d["gpu_s"][-1]
    return min(flops, profile.gpu_flops) if profile.gpu_flops else flops


def predict_throughput(cfg: ModelConfig, profile: HardwareProfile, pol: ThroughputPolicy, prompt_len: int,
                       gen_len: int, b: int = 2, rates: PipelineRates = PipelineRates(),
                       eb: int | None = None) -> ThroughputPrediction:
    """rates: the pipeline's kernels measured (pipeline/attention_bench.py, pipeline/weights.py). CPU attention
    reads beside the streamed experts' copies at the shared rate, never above the bus; each micro-batch's call
    pays its fixed part. Prefill's experts run at the grouped calls' measured rate, else at the profile's
    one-expert rate plus a read of every expert per pass."""
    L, E, K = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
    H, I = cfg.hidden_size, cfg.expert_intermediate_size
    heads, kv_heads, D, shared = cpu_attention_shape(cfg)
    qkv = (heads + (1 if shared else 2) * kv_heads) * D     # what goes to the host per sequence
    kv_tok = cfg.kv_bytes_per_token(b) // cfg.num_hidden_layers  # one token's cache in one layer
    w_layer = layer_expert_bytes(cfg, b, eb)
    dense = cfg.layer_dense_numel(cfg.moe_layers[0])
    N, mu = pol.N, pol.mu
    n_mb = math.ceil(N / mu)
    ctx = prompt_len + gen_len / 2                           # average context over the generation
    # Decode, one MoE layer.
    h2d = w_layer * (1 - pol.r_w) + (N * heads * D * b if not pol.attn_gpu else N * ctx * kv_tok * (1 - pol.r_c))
    d2h = N * qkv * b if not pol.attn_gpu else N * kv_tok * (1 - pol.r_c)
    seen = attended(cfg, ctx)                                # positions a layer's attention reads, on average
    attn_flops, attn_bytes = 4 * seen * heads * D, seen * kv_tok  # per sequence
    cpu_beside, h2d_beside = shared_rates(profile) if pol.r_w < 1 else (profile.cpu_read_bw, profile.h2d_bw)
    attn_rate = min(rates.attn_bw or cpu_beside, cpu_beside)
    cpu_s = 0.0 if pol.attn_gpu else \
        N * max(attn_flops / profile.cpu_flops, attn_bytes / attn_rate) + n_mb * rates.attn_call_s
    used = E * (1 - (1 - K / E) ** mu)                       # experts a micro-batch touches
    gpu_flops = 2 * mu * dense + 6 * mu * K * H * I + (mu * attn_flops if pol.attn_gpu else 0)
    gpu_bytes = dense * b + used * w_layer / E + 2 * mu * K * (H + I) * b + \
        (mu * attn_bytes if pol.attn_gpu else 0)
    terms = {
        "PCIe": max(copy_beside(h2d, profile.h2d_bw, h2d_beside, cpu_s) + n_mb * profile.h2d_latency_s,
                    d2h / profile.d2h_bw),
        "CPU memory bus": cpu_s,
        "GPU": n_mb * max(gpu_flops / profile.gpu_flops, gpu_bytes / profile.gpu_bw),
        "host overhead": n_mb * profile.layer_overhead_s,
    }
    # the micro-batches' attention runs one after another on the CPU; the last one's GPU share follows it
    layer_s = max(*terms.values(), cpu_s + terms["GPU"] / n_mb if cpu_s else 0.0)
    dense_layers = sum(n_mb * max(2 * mu * cfg.layer_dense_numel(i) / profile.gpu_flops,
                                  cfg.layer_dense_numel(i) * b / profile.gpu_bw) for i in cfg.dense_layers)
    step_s = L * layer_s + dense_layers + N * cfg.vocab_size * H * 2 / profile.gpu_flops + \
        cfg.vocab_size * H * b / profile.gpu_bw
    # Prefill: the whole batch layer by layer in rounds of PREFILL_GROUP tokens (weights streamed once per round),
    # each round in passes of PREFILL_CHUNK tokens (weights read from GPU memory once per pass).
    tokens = N * prompt_len
    passes, rounds = math.ceil(tokens / PREFILL_CHUNK), math.ceil(tokens / PREFILL_GROUP)
    # The experts at the GPU's measured expert rate, not its peak matmul; K/V cross to the host beside the work.
    pf_gpu = (tokens * 2 * dense + N * 2 * prompt_len**2 * heads * cfg.head_dim) / profile.gpu_flops + \
        tokens * 6 * K * H * I / (rates.prefill_flops or expert_gpu_flops(cfg, profile, b))
    expert_reads = 0 if rates.prefill_flops else passes * w_layer
    pf_layer = max(rounds * w_layer * (1 - pol.r_w) / profile.h2d_bw,
                   tokens * kv_tok * (1 - pol.r_c) / profile.d2h_bw,
                   pf_gpu + (passes * dense * b + expert_reads) / profile.gpu_bw)
    prefill_s = cfg.num_hidden_layers * pf_layer
    gpu_need, host_need = throughput_memory(cfg, pol, prompt_len, gen_len, b, eb)
    total = prefill_s + (gen_len - 1) * step_s  # the prefill gives each sequence its first token
    return ThroughputPrediction(pol, N * gen_len / total, N / step_s, prefill_s, layer_s, terms,
                                max(terms, key=terms.get), gpu_need, host_need, rates)
