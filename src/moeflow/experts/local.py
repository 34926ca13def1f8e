"""The reference expert backend: every expert computed on the device that holds the store."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.experts.store import ExpertStore


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x [n, H], gate_up [2I, H], down [H, I] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, down)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Sort the (token, slot) pairs by expert: one host sync gives each expert's token count.

    Returns (order [N*K] flat indices into topk_ids grouped by expert, counts list[E])."""
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


class LocalExperts:
    """Runs each selected expert on its tokens where the weights are; the all-on-one-device reference."""

    def __init__(self, store: ExpertStore):
        self.store = store

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        N, K = topk_ids.shape
        gate_up, down = self.store.gate_up(layer), self.store.down(layer)  # [E, 2I, H], [E, H, I]
        order, counts = group_by_expert(topk_ids, gate_up.shape[0])
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)  # fp32 accumulation
        flat_w = topk_weights.flatten()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            start += n
            tok = idx // K
            y = expert_ffn(x[tok], gate_up[e], down[e])                  # [n, H]
            out.index_add_(0, tok, y.float() * flat_w[idx, None].float())
        return out.to(x.dtype)
