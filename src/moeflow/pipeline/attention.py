"""Decode attention on the CPU over the host KV cache (MoE-Lightning, arXiv 2411.11217): one new token per sequence.

Legend: B = sequences of the micro-batch, Hq/Hkv = query/key-value heads, D = head dim, T = cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.pipeline.native import NativeAttention


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: list[int], starts: list[int],
                         window: int | None = None, native: NativeAttention | None = None,
                         threads: int = 1) -> torch.Tensor:
    """Write each sequence's new k/v at its position, then attend over its slot (the last `window` positions):
    by the native kernel where given, else in one PyTorch call padded to the longest context.

    q [B, Hq, D], k/v [B, Hkv, D], k_cache/v_cache [S, T, Hkv, D] (host) -> [B, Hq, D]."""
    idx, pos = torch.tensor(slots), torch.tensor(starts)
    k_cache[idx, pos] = k
    v_cache[idx, pos] = v
    if native is not None and native.supports(k_cache):
        ends = pos + 1
        firsts = ends - ends if window is None else (ends - window).clamp(min=0)
        i32 = [t.to(torch.int32).contiguous() for t in (idx, firsts, ends)]
        return native(q, k_cache, v_cache, *i32, threads).to(q.dtype)
    T = max(starts) + 1
    K, V = k_cache[idx, :T], v_cache[idx, :T]                                # [B, T, Hkv, D]
    k_pos = torch.arange(T)
    mask = k_pos[None, :] <= pos[:, None]                                     # [B, T]
    if window is not None:
        mask &= pos[:, None] - k_pos[None, :] < window
    o = F.scaled_dot_product_attention(q[:, :, None], K.transpose(1, 2), V.transpose(1, 2),
                                       attn_mask=mask[:, None, None], enable_gqa=q.shape[1] != k.shape[1])
    return o[:, :, 0]                                                         # [B, Hq, D]
