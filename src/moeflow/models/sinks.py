"""Attention with sinks (GPT-OSS): a learned logit per head joins each query's softmax and takes its share of the
weight but adds no value (arXiv:2309.17453). SDPA has no such term, so these layers run the softmax in PyTorch,
a chunk of queries at a time: a long prompt's scores [B, Hq, Tq, Tk] would otherwise outgrow the GPU budget's
workspace (engine/budget.py counts SCORE_TENSORS of one chunk).

Legend: B = sequences, Hq/Hkv = query/key-value heads, Tq/Tk = query/key positions, D = head dim, C = a chunk's
queries.
"""

from __future__ import annotations

import torch

CHUNK_SCORE_BYTES = 64 << 20  # one chunk's scores [B, Hq, C, Tk] at most (one query row whatever its size)
SCORE_TENSORS = 5             # score-sized tensors alive at once in a chunk (scores, with the sink, shifted, softmax)


def chunk_queries(B: int, Hq: int, Tk: int, itemsize: int) -> int:
    """Queries per chunk: as many as keep one chunk's scores within CHUNK_SCORE_BYTES, at least one."""
    return max(1, CHUNK_SCORE_BYTES // max(B * Hq * Tk * itemsize, 1))


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                   sinks: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask broadcastable to [B, Hq, Tq, Tk] (True: may attend) or None,
    causal: top-left aligned as SDPA's is_causal, sinks [Hq] -> [B, Hq, Tq, D]."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)        # [B, Hq, Tk, D]
    C = chunk_queries(B, Hq, k.shape[2], q.element_size())
    if Tq <= C:
        return _rows(q, k, v, mask, causal, 0, sinks)
    out = []
    for i in range(0, Tq, C):
        m = mask[..., i:i + C, :] if mask is not None and mask.shape[-2] == Tq else mask
        out.append(_rows(q[:, :, i:i + C], k, v, m, causal, i, sinks))
    return torch.cat(out, dim=2)


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, first: int,
          sinks: torch.Tensor) -> torch.Tensor:
    """Queries first : first + C of sink_attention (k, v repeated to the query heads) -> [B, Hq, C, D]."""
    B, Hq, C, D = q.shape
    s = (q @ k.transpose(-1, -2)) * D ** -0.5                                      # [B, Hq, C, Tk]
    if causal:
        keep = torch.ones(C, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=first)
        mask = keep if mask is None else mask & keep
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, C, 1)
    logits = torch.cat((s, sink), dim=-1)
    p = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]  # the sink's share dropped
    return p.to(v.dtype) @ v
