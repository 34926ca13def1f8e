"""Batch-invariant forward (`--deterministic`): a token's result does not depend on the other sequences of its step.

A matmul kernel chooses its blocking (and so its bf16 rounding) by the number of rows, so the same token can round
differently beside 1 or 31 others. In this mode every matmul over packed tokens runs in row tiles of one fixed size
(the last tile padded), every expert FFN the same way, and attention runs per sequence (AttnBatch.per_sequence), so
each token meets the same kernels whatever the batch. Cost: padding decode steps up to TILE rows (see README).
Legend: N = packed tokens, M = TILE, H = hidden, O = output features, I = expert intermediate size, K = experts/token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.experts.base import ExpertBackend
from moeflow.experts.ffn import each_expert, expert_ffn
from moeflow.experts.store import ExpertStore

TILE = 16  # rows of every matmul in this mode: a decode batch of up to 16 sequences is one tile


def in_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn (row-wise) over x [N, ...] in tiles of TILE rows, the last one zero-padded -> fn(x) [N, ...]."""
    N = x.shape[0]
    pad = -N % TILE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return torch.cat([fn(t) for t in x.split(TILE)])[:N]


class TiledLinear(nn.Module):
    """nn.Linear run in row tiles of TILE; holds the original layer's parameters (same names, ties kept)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = in_tiles(lambda t: F.linear(t, self.weight, self.bias), x.reshape(-1, x.shape[-1]))  # [N, O]
        return y.view(*lead, -1)


class InvariantExperts(ExpertBackend):
    """The routed experts on the store's device, each expert's tokens in row tiles of TILE (no native kernel,
    no grouped GEMM: both choose their blocking by the token count)."""

    graph_safe = False

    def __init__(self, store: ExpertStore):
        self.store = store

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        gate_up, down_t = self.store.gate_up(layer), self.store.down_t(layer)  # [E, 2I, H], [E, I, H]
        return each_expert(x, topk_ids, topk_weights, gate_up.shape[0],  # fp32, summed in expert order
                           lambda e, xe: in_tiles(lambda t: expert_ffn(t, gate_up[e], down_t[e]), xe))


def make_batch_invariant(model: nn.Module, store: ExpertStore) -> None:
    """Swap every nn.Linear of `model` for a TiledLinear and its experts for InvariantExperts, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, TiledLinear(child))
    model.set_experts(InvariantExperts(store))
