"""Tensor parallelism for attention and the dense FFNs (Megatron's split, arXiv 1909.08053): each rank keeps
its share of the heads (q/k/v rows, o_proj columns) and of the FFN's intermediate rows (gate/up rows, down
columns), so each computes a partial output and one all-reduce per block sums them. The routed experts' partial
output (ep.py) joins the shared experts' before the MoE block's one all-reduce. A module that does not split
evenly (heads not divisible by the ranks, MLA, one q/k norm over all heads) stays whole on every rank, its
output counted once (rank 0's).
Legend: W = ranks, Hq/Hkv = query/key-value heads, D = head dim, I = intermediate, H = hidden.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moeflow.config import ModelConfig
from moeflow.dist.groups import Ranks
from moeflow.models.layers import Attention, DenseMLP, MoeTransformer


class AllReduced(nn.Module):
    """A block whose output is a partial sum on each rank: the sum over the ranks."""

    def __init__(self, inner: nn.Module, ranks: Ranks):
        super().__init__()
        self.inner, self.ranks = inner, ranks

    def forward(self, *args) -> torch.Tensor:
        return self.ranks.all_reduce(self.inner(*args))


class OnRankZero(nn.Module):
    """A whole (unsplit) module inside a partial-sum block: counted on rank 0 only, zeros elsewhere."""

    def __init__(self, inner: nn.Module, ranks: Ranks):
        super().__init__()
        self.inner, self.ranks = inner, ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if self.ranks.leader else torch.zeros_like(out)


def _rows(lin: nn.Linear, part: int, parts: int) -> None:
    """Keep output rows part/parts of a Linear (column parallel), with its bias."""
    n = lin.out_features // parts
    lin.weight = nn.Parameter(lin.weight.data[part * n:(part + 1) * n].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[part * n:(part + 1) * n].clone(), requires_grad=False)
    lin.out_features = n


def _cols(lin: nn.Linear, part: int, parts: int) -> None:
    """Keep input columns part/parts of a Linear (row parallel); its bias counted once, on rank 0."""
    n = lin.in_features // parts
    lin.weight = nn.Parameter(lin.weight.data[:, part * n:(part + 1) * n].clone(), requires_grad=False)
    if lin.bias is not None and part != 0:
        lin.bias = nn.Parameter(torch.zeros_like(lin.bias.data), requires_grad=False)
    lin.in_features = n


def attention_splits(cfg: ModelConfig, world: int) -> bool:
    """Whether every layer's attention splits by heads over `world` ranks."""
    return (not cfg.kv_lora_rank and not cfg.qk_norm_whole and cfg.num_attention_heads % world == 0
            and cfg.num_key_value_heads % world == 0)


def split_attention(attn: Attention, r: int, w: int) -> None:
    """Keep this rank's heads: Hq/W query heads and the Hkv/W key-value heads they read (GQA groups stay whole)."""
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        _rows(lin, r, w)
    _cols(attn.o_proj, r, w)
    if attn.sinks is not None:
        n = attn.n_heads // w
        attn.sinks = nn.Parameter(attn.sinks.data[r * n:(r + 1) * n].clone(), requires_grad=False)
    attn.n_heads, attn.n_kv = attn.n_heads // w, attn.n_kv // w


def split_mlp(mlp: DenseMLP, r: int, w: int) -> bool:
    """Keep this rank's intermediate rows; False (left whole) where they do not divide."""
    if mlp.gate_proj.out_features % w:
        return False
    _rows(mlp.gate_proj, r, w)
    _rows(mlp.up_proj, r, w)
    _cols(mlp.down_proj, r, w)
    return True


def _split_dense(block: nn.Module, ranks: Ranks) -> nn.Module:
    """Every DenseMLP inside block split (or, where it cannot be, counted on rank 0); block itself if one."""
    if isinstance(block, DenseMLP):
        return block if split_mlp(block, ranks.rank, ranks.world) else OnRankZero(block, ranks)
    for name, child in list(block.named_children()):
        setattr(block, name, _split_dense(child, ranks))
    return block


def split_model(model: MoeTransformer, cfg: ModelConfig, ranks: Ranks) -> ModelConfig:
    """Split attention and dense FFNs across the ranks, in place; returns the config of this rank's KV cache.
    The MoE block's routed experts must already return partial sums (ep.py)."""
    heads = attention_splits(cfg, ranks.world)
    for layer in model.layers:
        if heads:
            split_attention(layer.self_attn, ranks.rank, ranks.world)
            layer.self_attn = AllReduced(layer.self_attn, ranks)
        layer.mlp = AllReduced(_split_dense(layer.mlp, ranks), ranks)
    if not heads:
        return cfg
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // ranks.world,
                   num_key_value_heads=cfg.num_key_value_heads // ranks.world)
