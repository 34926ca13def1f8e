"""Typed, frozen configuration: ModelConfig is what the model code needs, whatever the architecture."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeflow import MoeflowError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MoeflowError(f"unsupported dtype {name!r}; choose one of bf16, fp16, fp32")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int      # FFN width of one routed expert
    norm_topk_prob: bool               # renormalize the top-k gate probabilities to sum to one
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    dense_intermediate_size: int = 0   # FFN width of the dense layers (Qwen3 mlp_only_layers)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts
    qk_norm: bool = False              # RMSNorm on each query/key head (Qwen3)
    attention_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # RoPE scaling parameters as sorted (key, value) items (models/rope.py); (): plain RoPE
    rope_scaling: tuple = ()
    rope_interleave: bool = False      # rotate adjacent pairs (DeepSeek) rather than the two halves
    # Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434); kv_lora_rank 0: ordinary attention.
    # With MLA, head_dim is the query/key head (nope + rope) and num_key_value_heads the expanded heads.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    shared_intermediate_size: int = 0  # FFN width of the shared experts every token runs (all of them together)
    shared_expert_gate: bool = False   # the shared experts' output scaled by a sigmoid gate (Qwen2-MoE)
    qkv_bias: bool = False             # biases on q/k/v only (Qwen2-MoE); attention_bias: on o too
    scoring: str = "softmax"           # router scores: softmax or sigmoid (DeepSeek-V3)
    topk_method: str = "greedy"        # greedy, group_limited_greedy (DeepSeek-V2), noaux_tc (DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    qk_norm_whole: bool = False        # q/k RMSNorm over the whole projection, not per head (OLMoE)
    layer_norm: bool = False           # LayerNorm with bias in place of RMSNorm (Phi-3.5-MoE)
    lm_head_bias: bool = False
    router: str = "softmax_topk"       # models/routers.py ROUTERS key
    router_bias: bool = False          # the router's linear layer has a bias (GPT-OSS)
    router_jitter_eps: float = 0.0     # sparsemixer's masking threshold (Phi-3.5-MoE)
    layer_windows: tuple = ()          # each layer's sliding window or None (GPT-OSS); () = sliding_window everywhere
    attention_sinks: bool = False      # a learned per-head logit in the softmax's denominator (GPT-OSS)
    expert_bias: bool = False          # routed experts with gate/up/down biases, clamped SwiGLU (GPT-OSS)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.dense_layers]

    @property
    def expert_numel(self) -> int:
        """Elements of one expert: gate, up and down (stored transposed), [I, H] each; then, with expert_bias,
        the gate, up and down biases (I, I, H)."""
        I, H = self.expert_intermediate_size, self.hidden_size
        return 3 * I * H + (2 * I + H if self.expert_bias else 0)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return self.expert_numel * dtype.itemsize

    @property
    def attention_numel(self) -> int:
        """One layer's attention weights (MLA: the low-rank projections and their norms)."""
        H, D, bias = self.hidden_size, self.head_dim, self.attention_bias
        if self.kv_lora_rank:
            heads, r, qr = self.num_attention_heads, self.kv_lora_rank, self.q_lora_rank
            a = r + self.qk_rope_head_dim  # kv_a_proj_with_mqa's outputs
            q = H * heads * D if qr is None else (H + bias) * qr + qr + qr * heads * D  # q_a, its norm, q_b
            kv = (H + bias) * a + r + r * heads * (self.qk_nope_head_dim + self.v_head_dim)  # kv_a, norm, kv_b
            return q + kv + heads * self.v_head_dim * H + (H if bias else 0)
        q, kv = self.num_attention_heads * D, self.num_key_value_heads * D
        qkv_bias = q + 2 * kv if bias or self.qkv_bias else 0
        attn = H * (q + 2 * kv) + q * H + qkv_bias + (H if bias else 0)
        attn += (q + kv if self.qk_norm_whole else 2 * D) if self.qk_norm else 0
        return attn + (self.num_attention_heads if self.attention_sinks else 0)

    def layer_dense_numel(self, layer: int) -> int:
        """Non-expert weights of one decoder layer: attention, norms, and the router (with the shared experts)
        or the dense MLP."""
        H = self.hidden_size
        if layer in self.dense_layers:
            mlp = 3 * H * self.dense_intermediate_size
        else:
            mlp = (H + 1 if self.router_bias else H) * self.num_experts
            mlp += 3 * H * self.shared_intermediate_size + (H if self.shared_expert_gate else 0)
            mlp += self.num_experts if self.topk_method == "noaux_tc" else 0  # e_score_correction_bias
        return self.attention_numel + (4 * H if self.layer_norm else 2 * H) + mlp

    @property
    def dense_numel(self) -> int:
        """Every weight but the routed experts (what Checkpoint.dense_bytes counts), from the config alone."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        head += self.vocab_size if self.lm_head_bias else 0
        layers = sum(self.layer_dense_numel(i) for i in range(self.num_hidden_layers))
        final_norm = 2 * self.hidden_size if self.layer_norm else self.hidden_size
        return self.vocab_size * self.hidden_size + layers + final_norm + head

    @property
    def kv_token_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One token's two cache tensors in one layer: K and V heads [Hkv, D], or MLA's compressed latent
        [kv_lora_rank] and its decoupled rope key [qk_rope_head_dim]."""
        if self.kv_lora_rank:
            return (self.kv_lora_rank,), (self.qk_rope_head_dim,)
        return (self.num_key_value_heads, self.head_dim), (self.num_key_value_heads, self.head_dim)

    def kv_bytes_per_token(self, dtype: torch.dtype | int) -> int:
        """One token's KV cache over all layers; dtype may be given as bytes per element."""
        itemsize = dtype if isinstance(dtype, int) else dtype.itemsize
        return self.num_hidden_layers * sum(math.prod(s) for s in self.kv_token_shapes) * itemsize


def rope_theta_from_hf(hf: dict, scaled: tuple[str, ...] = ()) -> float:
    """Read RoPE settings in both the transformers 4 (`rope_theta`) and 5 (`rope_parameters`) layouts; scaling
    types in `scaled` are the caller's to read (models/rope.py)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # Either field may carry a scaling type (transformers honours rope_scaling beside rope_parameters).
    for rope_type in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if rope_type not in (None, "default", *scaled):
            raise MoeflowError(f"unsupported RoPE type {rope_type!r} in config.json; moeflow supports 'default'")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def eos_ids_from(*values) -> tuple[int, ...]:
    ids: list[int] = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def shared_fields(hf: dict, rms_norm_eps: float, max_positions: int) -> dict:
    """The ModelConfig fields every architecture reads from config.json alike (defaults: the family's)."""
    H, heads, n_layers = require(hf, "hidden_size", "num_attention_heads", "num_hidden_layers")
    return dict(vocab_size=require(hf, "vocab_size")[0], hidden_size=H, num_hidden_layers=n_layers,
                num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or H // heads, rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
                max_position_embeddings=hf.get("max_position_embeddings", max_positions),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
                bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids_from(hf.get("eos_token_id")))


def require(hf: dict, *keys: str):
    missing = [k for k in keys if k not in hf]
    if missing:
        raise MoeflowError(f"config.json lacks {', '.join(missing)} (model_type {hf.get('model_type')!r})")
    return [hf[k] for k in keys]


def read_json(f: Path) -> dict:
    """A JSON object from a checkpoint file, or a MoeflowError naming the file."""
    try:
        value = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeflowError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise MoeflowError(f"{f} must hold a JSON object, not {type(value).__name__}")
    return value


def write_whole(path: Path, text: str, encoding: str | None = None) -> None:
    """path's new text written to a sibling first, then renamed over it: a reader (or a crash) never sees half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding=encoding)
    tmp.replace(path)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text: str) -> int:
    """'24GiB', '24G' (binary), '24GB' (decimal), '512MiB', '1000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MoeflowError(f"cannot read the size {text!r}; write e.g. 24GiB, 512MiB or 24GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class OffloadConfig:
    """The latency regime: experts in host memory, the GPU capped at `gpu_memory` bytes."""

    gpu_memory: int
    policy: str = "auto"
    placement: str | None = None      # JSON from `moeflow profile-experts`
    routing_trace: str | None = None  # replay a recorded routing (benchmarks)
    eviction: str | None = None       # the cache's eviction policy; None: the offloading policy's own
    expert_maps: str | None = None    # policy fmoe: expert-map file to start from (maps/store.py)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model; its fields give every `moeflow` subcommand its defaults (one name each)."""

    model: str = "builtin:pydoc-moe"  # the embedded default: a small Mixtral trained on the Python docs
    device: str | None = None   # cpu | cuda; None: cuda where available
    dtype: str = "auto"         # auto: bf16 on cuda, the checkpoint's on cpu
    max_running: int = 8        # sequences decoded together (KV cache slots)
    max_len: int | None = None  # tokens per sequence, prompt + generated; None: the model's context
    cuda_graphs: bool = True    # a lone sequence's decode step replayed as a CUDA graph
    deterministic: bool = False  # batch-invariant forward: a token's output does not depend on its batch

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """moeflow's cache folder (hardware profiles; the native kernel's builds under ext/): $MOEFLOW_CACHE_DIR,
    else $XDG_CACHE_HOME/moeflow, else ~/.cache/moeflow."""
    import os

    if d := os.environ.get("MOEFLOW_CACHE_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeflow"


CPU_KERNELS = ("auto", "torch", "scalar", "avx2", "avx512", "amx", "amx-emu")


@dataclass(frozen=True)
class CpuKernelConfig:
    """The native CPU expert kernel's settings (experts/cpu.py, csrc/cpu_experts.cpp); `bench cpu-experts` flags.
    kernel: auto (the fastest this CPU runs) | torch | scalar | avx2 | avx512 | amx | amx-emu."""

    kernel: str = "auto"
    threads: int | None = None          # None: the physical cores (less one beside a GPU driver)
    amx_min_tokens: int | None = None   # fewest tokens of an expert on the AMX tiles (None: 16; amx-emu: 1)
    fused_max_bytes: int = 64 << 20     # vector path: down fused into gate/up while the chunks' sums fit this
    # AMX blocking: rows of down_t per chunk, of H per gate/up slice, rows per gate/up block (a sweep's best)
    amx_blocking: tuple[int, int, int] = (256, 512, 32)
    gemv_rows: int = 1                  # AVX-512 path, up to 8 tokens: gate/up rows per pass (1, 2 or 4)
    prefetch: int = 0                   # vector path: software prefetch this many bytes ahead (0: none)
    down_direct: bool = False           # vector path, up to 8 tokens: down's weights widened in registers
    quant_avx512: bool = False          # int4/int8 on the AVX-512 code (else AVX2 code) where avx512 or amx runs
    int4_bf16: bool = False             # with quant_avx512, int4 in groups of 64k: gate/up by vdpbf16ps
    quant_int8_tokens: int = 8          # AVX2 int4, experts of up to this many tokens: int8 tokens (0: fp32;
                                        # fp32 models always 0)
    quant_int8_on_int8: bool = False    # the same integer dot products for int8 experts
    quant_vnni: int = 1                 # AVX2 int4, one token: 0 in AVX2, 1 by AVX512-VNNI (+ VBMI) where the
                                        # CPU has it, 2 the VNNI code emulated in scalar (tests)
    quant_prefetch: int = 4096          # integer-dot int4/int8 gate/up: rows prefetched this many bytes ahead
                                        # (0: none, the hardware prefetchers alone)
    pin: bool = False                   # pin the kernel's worker threads, one per core
    spin: int = 256                     # pause iterations idle workers spin before they sleep

    def __post_init__(self):
        if self.kernel not in CPU_KERNELS:
            raise MoeflowError(f"CPU kernel {self.kernel!r}: choose one of {', '.join(CPU_KERNELS)}")
        if self.threads is not None and self.threads < 1:
            raise MoeflowError(f"CPU kernel threads {self.threads}: must be at least 1")
        if self.quant_vnni not in (0, 1, 2):
            raise MoeflowError(f"CPU kernel quant_vnni {self.quant_vnni}: choose 0 (off), 1 (on) or 2 (emulated)")
        if self.gemv_rows not in (1, 2, 4):
            raise MoeflowError(f"CPU kernel gemv rows {self.gemv_rows}: choose 1, 2 or 4")
        if min(self.prefetch, self.spin, self.fused_max_bytes, self.quant_int8_tokens, self.quant_prefetch) < 0:
            raise MoeflowError("CPU kernel prefetch, spin, fused bytes, int8 tokens and quant prefetch must not be "
                               "negative")
        if self.quant_prefetch > 1 << 20:
            raise MoeflowError(f"CPU kernel quant_prefetch {self.quant_prefetch}: at most 1048576 bytes ahead")
