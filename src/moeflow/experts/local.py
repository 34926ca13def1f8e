"""The reference expert backend: every expert computed on the device that holds the store (a bf16 host store:
by the native CPU kernel, experts/cpu.py; a CUDA store: the Triton fused-MoE kernels where they run)."""

from __future__ import annotations

import torch

from moeflow.experts import fused_moe
from moeflow.experts.base import ExpertBackend
from moeflow.experts.cpu import CpuExperts
# the FFN maths, importable here as before
from moeflow.experts.ffn import (block_ffn, can_group, expert_ffn, group_by_expert, grouped_experts,  # noqa: F401
                                 grouped_ffn, looped_experts, partial_ffn, quantized_experts, quantized_ffn)
from moeflow.experts.store import ExpertStore
from moeflow.quant import grouped as qgrouped
from moeflow.quant import triton_int4, triton_moe

# the fused kernels by default on CUDA stores (False: PyTorch's grouped GEMMs unless a caller asks)
FUSED_DEFAULT = True


class LocalExperts(ExpertBackend):
    """Runs each selected expert on its tokens where the weights are; the all-on-one-device reference."""

    def __init__(self, store: ExpertStore, grouped: bool | None = None, fused: bool | None = None):
        self.store, self.grouped = store, grouped  # grouped: None = where supported
        # fused: the Triton kernels (experts/fused_moe.py) where they run; None = FUSED_DEFAULT
        self.fused = (FUSED_DEFAULT if fused is None else fused) and fused_runs(store)
        self.cpu = None  # CpuExperts: the native kernel, made at the first call on a bf16 host store

    @property
    def graph_safe(self) -> bool:
        """True when a forward pass makes no host sync (so it can be captured in a CUDA graph)."""
        if self.store.cfg.expert_bias:  # GPT-OSS's decode (sink attention) is not captured whole: not yet measured
            return False
        return self.fused or (self.grouped is not False and can_group(self.store.data))

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        d = self.store.data
        if self.store.cfg.expert_bias:  # GPT-OSS: biases and clamped SwiGLU (experts/biased.py)
            from moeflow.experts.biased import biased_layer

            s = self.store
            if (y := self._native(layer, x, topk_ids, topk_weights)) is not None:  # bf16: its biased path
                return y
            return biased_layer(x, topk_ids, topk_weights, s.gate_up(layer), s.down_t(layer), s.bias(layer), s.fmt,
                                s.cfg, bool(self.grouped or (self.grouped is None and can_group(x))))
        if self.store.fmt.quantized:
            if d.device.type == "cpu":
                self.cpu = self.cpu or CpuExperts(fmt=self.store.fmt)
            return quantized_layer(x, topk_ids, topk_weights, d[self.store.slot[layer]], self.store.fmt,
                                   self.fused, self.cpu)
        if self.fused and fused_moe.available(x):
            return fused_moe.fused_experts(x, topk_ids, topk_weights, self.store.gate_up(layer),
                                           self.store.down_t(layer))
        if self.store.down_transposed and (y := self._native(layer, x, topk_ids, topk_weights)) is not None:
            return y
        gate_up, down_t = self.store.gate_up(layer), self.store.down_t(layer)  # [E, 2I, H], [E, I, H]
        if self.grouped or (self.grouped is None and can_group(x)):
            return grouped_experts(x, topk_ids, topk_weights, gate_up, down_t)
        return looped_experts(x, topk_ids, topk_weights, gate_up, down_t)

    def _native(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
                ) -> torch.Tensor | None:
        """The layer by the native CPU kernel where the store is in host memory (bf16 blocks, plain or biased, or
        int4/int8 ones) and the kernel takes its format; else None."""
        d, fmt = self.store.data, self.store.fmt
        if d.device.type != "cpu" or not (d.dtype == torch.bfloat16 or fmt.quantized):
            return None
        self.cpu = self.cpu or CpuExperts(fmt=fmt)
        if not self.cpu.uses_native(d):
            return None
        return self.cpu.layer(d[self.store.slot[layer]], x, topk_ids, topk_weights).to(x.dtype)

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.close()


def quantized_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks: torch.Tensor,
                    fmt, fused: bool = True, cpu: CpuExperts | None = None) -> torch.Tensor:
    """One layer's quantized experts, blocks [E, block] on x's device, on x [N, H] -> [N, H]: on CUDA the fused
    Triton kernels (fused; decode's GEMVs where they take the format), else grouped GEMMs over a batched
    dequantization; in host memory the native kernel (cpu, where it takes the format); else each expert
    dequantized (the fallback on any device)."""
    if fused and triton_moe.available(x, fmt):
        if x.shape[0] <= triton_int4.GEMV_MAX_TOKENS and qgrouped.gemv_waves(blocks, fmt):
            return qgrouped.gemv_experts(x, topk_ids, topk_weights, blocks, fmt)
        return triton_moe.quantized_fused_experts(x, topk_ids, topk_weights, blocks, fmt)
    if qgrouped.groupable(blocks, fmt, topk_ids.numel()):  # decode: one batched dequantization
        return qgrouped.entry_experts(x, topk_ids, topk_weights, blocks, fmt)
    if cpu is not None and blocks.device.type == "cpu" and cpu.uses_native(blocks):  # its int4/int8 path
        return cpu.layer(blocks, x, topk_ids, topk_weights).to(x.dtype)
    return quantized_experts(x, topk_ids, topk_weights, blocks, fmt)


def fused_runs(store: ExpertStore) -> bool:
    """The fused kernels serve this store: on CUDA, bf16/fp16, no biases, a quantized format whose tiles fit."""
    d, fmt = store.data, store.fmt
    if fused_moe.triton is None or not d.is_cuda or fmt.dtype not in (torch.bfloat16, torch.float16):
        return False
    return not store.cfg.expert_bias and (not fmt.quantized or triton_moe.fits(fmt))
