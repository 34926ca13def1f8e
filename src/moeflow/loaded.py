"""A model ready to run (Checkpoint), and what loading one decides before reading any weight: the device, the
dtype, whether the weights fit the GPU. Shared by the folder loader (checkpoint.py) and the random-weight
builder (synthetic.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeflow import MoeflowError
from moeflow.config import ModelConfig, parse_dtype
from moeflow.experts.store import ExpertStore
from moeflow.models.base import Architecture
from moeflow.models.layers import MoeTransformer
from moeflow.quant.format import QuantSpec
from moeflow.tokenizer import TextTokenizer


@dataclass
class Checkpoint:
    """A model ready to run: the module tree (every weight but the experts) and the expert store."""

    name: str
    arch: type[Architecture]
    cfg: ModelConfig
    model: MoeTransformer
    store: ExpertStore
    tokenizer: TextTokenizer
    generation: dict = field(default_factory=dict)  # generation_config.json
    synthetic: bool = False

    @property
    def eos_ids(self) -> list[int]:
        ids = list(self.cfg.eos_token_ids)
        gen = self.generation.get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids or self.tokenizer.eos_ids

    @property
    def dense_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device | None = None) -> torch.dtype:
    """`auto`: bf16 on a GPU, the checkpoint's own dtype on the CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else parse_dtype(cfg.torch_dtype)
    return parse_dtype(dtype)


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise MoeflowError(f"unsupported device {str(device)!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeflowError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    if device.type not in ("cpu", "cuda"):
        raise MoeflowError(f"unsupported device {str(device)!r}; use cpu or cuda")
    return device


def check_fits(name: str, arch: type[Architecture], cfg: ModelConfig, dtype: torch.dtype,
               device: torch.device, expert_device: torch.device, quant: QuantSpec | None = None) -> None:
    """Refuse, with the numbers, a model whose weights cannot fit the GPU, before allocating anything."""
    if device.type != "cuda" and expert_device.type != "cuda":
        return
    with torch.device("meta"):
        model = arch.build(cfg, None)
    dense = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    from moeflow.quant.format import ExpertFormat

    fmt = ExpertFormat(cfg.expert_intermediate_size, cfg.hidden_size, dtype, quant)
    experts = len(cfg.moe_layers) * cfg.num_experts * (fmt.block_bytes if quant else cfg.expert_bytes(dtype))
    need = (dense if device.type == "cuda" else 0) + (experts if expert_device.type == "cuda" else 0)
    free, total = torch.cuda.mem_get_info(device if device.type == "cuda" else expert_device)
    if need > free - (1 << 30):  # keep 1 GiB for the KV cache and activations
        raise MoeflowError(f"{name} needs {need / 2**30:.1f} GiB of weights on the GPU but only "
                           f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB is free; run it with --device cpu")
