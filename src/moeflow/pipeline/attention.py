"""Decode attention on the CPU over the host KV cache (MoE-Lightning, arXiv 2411.11217): one new token per sequence.

Legend: B = sequences of the micro-batch, Hq/Hkv = query/key-value heads, D = head dim, P = arena positions,
T = cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.pipeline.native import KINDS, NativeAttention


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, runs: list[int], starts: list[int],
                         window: int | None = None, native: NativeAttention | None = None,
                         threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Write each sequence's new k/v at its position of its run, then attend over the run (the last `window`
    positions): by the native kernel where given (one call, the writes included), else in one PyTorch call
    padded to the longest context.

    q [B, Hq, D], k/v [B, Hkv, D], k_cache/v_cache [P, Hkv, D] (host arenas; a run starts at runs[b]);
    out: where the native kernel writes (fp32 or bf16, e.g. pinned for the copy back) -> [B, Hq, D] in q's dtype."""
    if native is not None and native.supports(k_cache):
        if out is None or out.dtype not in KINDS:
            out = torch.empty(q.shape, dtype=q.dtype if q.dtype in KINDS else torch.float32)
        i32 = [torch.tensor(x, dtype=torch.int32) for x in (runs, starts)]
        return native(q, k_cache, v_cache, *i32, window, threads, k, v, out).to(q.dtype)
    run, pos = torch.tensor(runs), torch.tensor(starts)
    k_cache[run + pos] = k
    v_cache[run + pos] = v
    T = max(starts) + 1
    k_pos = torch.arange(T)
    idx = run[:, None] + torch.minimum(k_pos[None, :], pos[:, None])        # [B, T] past the end: a valid row
    K, V = k_cache[idx], v_cache[idx]                                        # [B, T, Hkv, D]
    mask = k_pos[None, :] <= pos[:, None]                                     # [B, T]
    if window is not None:
        mask &= pos[:, None] - k_pos[None, :] < window
    o = F.scaled_dot_product_attention(q[:, :, None], K.transpose(1, 2), V.transpose(1, 2),
                                       attn_mask=mask[:, None, None], enable_gqa=q.shape[1] != k.shape[1])
    return o[:, :, 0]                                                         # [B, Hq, D]
