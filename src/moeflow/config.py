"""Typed, frozen configuration: ModelConfig is what the model code needs, whatever the architecture."""

from __future__ import annotations

import json
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
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.dense_layers]

    @property
    def expert_numel(self) -> int:
        """Elements of one expert: gate, up and down (stored transposed), [I, H] each."""
        return 3 * self.expert_intermediate_size * self.hidden_size

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return self.expert_numel * dtype.itemsize

    def layer_dense_numel(self, layer: int) -> int:
        """Non-expert weights of one decoder layer: attention, norms, and the router or the dense MLP."""
        H, D, bias = self.hidden_size, self.head_dim, self.attention_bias
        q, kv = self.num_attention_heads * D, self.num_key_value_heads * D
        attn = H * (q + 2 * kv) + q * H + (q + 2 * kv + H if bias else 0) + (2 * D if self.qk_norm else 0)
        mlp = 3 * H * self.dense_intermediate_size if layer in self.dense_layers else H * self.num_experts
        return attn + 2 * H + mlp

    @property
    def dense_numel(self) -> int:
        """Every weight but the routed experts (what Checkpoint.dense_bytes counts), from the config alone."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        layers = sum(self.layer_dense_numel(i) for i in range(self.num_hidden_layers))
        return self.vocab_size * self.hidden_size + layers + self.hidden_size + head

    def kv_bytes_per_token(self, dtype: torch.dtype | int) -> int:
        """K and V of one token over all layers; dtype may be given as bytes per element."""
        itemsize = dtype if isinstance(dtype, int) else dtype.itemsize
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize


def rope_theta_from_hf(hf: dict) -> float:
    """Read RoPE settings in both the transformers 4 (`rope_theta`) and 5 (`rope_parameters`) layouts."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # Either field may carry a scaling type (transformers honours rope_scaling beside rope_parameters).
    for rope_type in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if rope_type not in (None, "default"):
            raise MoeflowError(f"unsupported RoPE type {rope_type!r} in config.json; moeflow supports 'default'")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def eos_ids_from(*values) -> tuple[int, ...]:
    ids: list[int] = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


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
