"""Attention with sinks (GPT-OSS): a learned logit per head joins each query's softmax and takes its share of the
weight but adds no value (arXiv:2309.17453). SDPA has no such term, so these layers run the softmax in PyTorch.

Legend: B = sequences, Hq/Hkv = query/key-value heads, Tq/Tk = query/key positions, D = head dim.
"""

from __future__ import annotations

import torch


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                   sinks: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask broadcastable to [B, Hq, Tq, Tk] (True: may attend) or None,
    causal: top-left aligned as SDPA's is_causal, sinks [Hq] -> [B, Hq, Tq, D]."""
    B, Hq, Tq, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)        # [B, Hq, Tk, D]
    s = (q @ k.transpose(-1, -2)) * D ** -0.5                                      # [B, Hq, Tq, Tk]
    if causal:
        keep = torch.ones(Tq, k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = keep if mask is None else mask & keep
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)
    logits = torch.cat((s, sink), dim=-1)
    p = torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]  # the sink's share dropped
    return p.to(v.dtype) @ v
