"""Expert parallelism: each rank owns a set of (MoE layer, expert) pairs and holds only their weights.

Every rank routes every token (the router is replicated); ExpertParallel hands its inner backend only the
(token, expert) pairs this rank owns, one pair per row, and returns the partial output [N, H], which the MoE
block's all-reduce (tp.py) sums over the ranks. At batch 1 that all-reduce moves one hidden vector, less than
an all-to-all's dispatch and combine would. Ownership gives each rank the same number of experts per layer and
spreads the popular ones (a placement profile's counts, greedy by popularity), else round-robin.
Legend: N = tokens, K = experts per token, P = pairs this rank owns, H = hidden, L = MoE layers, E = experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moeflow.experts.base import ExpertBackend, BackendWrapper
from moeflow.experts.store import ExpertStore


def owners(counts: torch.Tensor | None, layers: int, experts: int, world: int) -> torch.Tensor:
    """[L, E] the rank that owns each expert: per layer the most popular first, each to the least loaded rank
    with room left (at most ceil(E / W) experts each); without counts, expert e to rank e % W."""
    if counts is None:
        return (torch.arange(experts) % world).repeat(layers, 1)
    room = -(-experts // world)
    out = torch.empty(layers, experts, dtype=torch.long)
    for li in range(layers):
        load, held = [0.0] * world, [0] * world
        for e in sorted(range(experts), key=lambda e: (-float(counts[li, e]), e)):
            r = min((r for r in range(world) if held[r] < room), key=lambda r: (load[r], r))
            out[li, e], load[r], held[r] = r, load[r] + float(counts[li, e]), held[r] + 1
    return out


def placement_counts(path: str | None, name: str, cfg) -> torch.Tensor | None:
    """[L, E] a placement file's counts (checked against the model), or None without one."""
    if not path:
        return None
    from moeflow.policy.placement import Placement

    placement = Placement.load(path)
    placement.check(name, cfg)
    return placement.counts


def local_ids(mine: torch.Tensor) -> torch.Tensor:
    """mine [L, E] (the experts this rank owns) -> each one's index in this rank's local store, -1 elsewhere."""
    return torch.where(mine, mine.long().cumsum(1) - 1, -1)


class OwnedStore(ExpertStore):
    """A whole-model store that a checkpoint load fills with this rank's experts only (owned [L, E]): the
    others' writes go to a scratch block, so their pages are never touched and take no host memory (a large
    allocation is mapped lazily). local_store() then copies the owned blocks out; not pinned (its share is)."""

    def __init__(self, cfg, dtype, device="cpu", quant=None, owned: torch.Tensor | None = None):
        super().__init__(cfg, dtype, device, quant=quant)
        self.owned = owned.tolist()
        self._scratch = torch.empty(self.data.shape[-1], dtype=self.data.dtype)  # [block]

    def _mine(self, layer: int, expert: int) -> bool:
        return self.owned[self.slot[layer]][expert]

    def set_expert(self, layer, expert, gate, up, down) -> None:
        if self._mine(layer, expert):
            super().set_expert(layer, expert, gate, up, down)

    def part(self, layer: int, expert: int, part: str) -> torch.Tensor:
        if self._mine(layer, expert) or self.fmt.quantized:
            return super().part(layer, expert, part)
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        w = self._scratch[:I * H].view(I, H)
        return w.t() if part == "down" else w

    def pin(self) -> None:
        """Its share is pinned as the rank's own store."""


def local_store(store: ExpertStore, local: torch.Tensor) -> ExpertStore:
    """A store (same device and layout) of this rank's experts only: ceil(E / W) per layer, a layer owning fewer
    leaves its last rows unused."""
    width = int((local >= 0).sum(1).max())
    cfg = replace(store.cfg, num_experts=width)
    out = ExpertStore(cfg, store.dtype, store.data.device, down_transposed=store.down_transposed,
                      quant=store.fmt.spec if store.fmt.quantized else None)
    out.data.zero_()
    for li, row in enumerate(local.tolist()):
        for e, j in enumerate(row):
            if j >= 0:
                out.data[li, j].copy_(store.data[li, e])
    return out


class ExpertParallel(BackendWrapper):
    """The inner backend (over this rank's local store) on the pairs this rank owns; a partial output.

    An inner backend that never syncs with the host (graph_safe: the GPU's grouped GEMMs) gets every token's K
    pairs, another rank's pairs sent to local expert 0 with weight 0 (a few rows more, no sync); any other gets
    only the owned pairs, one per row (it syncs anyway, and a CPU or copied expert costs by its tokens)."""

    def __init__(self, inner: ExpertBackend, local: torch.Tensor, moe_layers: list[int], device: torch.device,
                 compact: bool | None = None):
        super().__init__(inner)
        self.local = local.to(device)                       # [L, E]
        self.row = {layer: i for i, layer in enumerate(moe_layers)}
        self.compact = not inner.graph_safe if compact is None else compact

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        local = self.local[self.row[layer]][topk_ids]       # [N, K]
        mine = local >= 0
        if not self.compact:
            return self.inner(layer, x, local.clamp(min=0), topk_weights * mine)
        tok, k = mine.nonzero(as_tuple=True)                # [P] each
        out = torch.zeros_like(x)                           # [N, H]
        if tok.numel():
            part = self.inner(layer, x[tok], local[tok, k][:, None], topk_weights[tok, k][:, None])  # [P, H]
            out.index_add_(0, tok, part.to(x.dtype))
        return out
