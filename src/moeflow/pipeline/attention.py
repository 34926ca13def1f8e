"""Decode attention on the CPU over the host KV cache (MoE-Lightning, arXiv 2411.11217): one new token per sequence.

Legend: B = sequences of the micro-batch, Hq/Hkv = query/key-value heads, D = head dim, T = cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: list[int], starts: list[int],
                         window: int | None = None) -> torch.Tensor:
    """Write each sequence's new k/v at its position, then attend over its slot (the last `window` positions).

    q [B, Hq, D], k/v [B, Hkv, D], k_cache/v_cache [S, T, Hkv, D] (host) -> [B, Hq, D]."""
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for b, (slot, start) in enumerate(zip(slots, starts)):
        k_cache[slot, start] = k[b]
        v_cache[slot, start] = v[b]
        first = 0 if window is None else max(0, start + 1 - window)
        K, V = k_cache[slot, first:start + 1], v_cache[slot, first:start + 1]  # [T, Hkv, D] views
        o = F.scaled_dot_product_attention(q[b, :, None][None], K.transpose(0, 1)[None], V.transpose(0, 1)[None],
                                           enable_gqa=gqa)                # [1, Hq, 1, D]
        out[b] = o[0, :, 0]
    return out
