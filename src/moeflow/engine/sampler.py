"""Greedy and sampled next-token choice, per sequence (each may have its own parameters and seed)."""

from __future__ import annotations

import torch

from moeflow.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] fp32 -> one token per sequence."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for b, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            out.append(greedy[b])
            continue
        # Sampling runs on the CPU so that a seed gives the same tokens on every device.
        scores = logits[b].float().cpu() / p.temperature
        if not torch.isfinite(scores).all():  # a temperature so small the scores overflow: its limit, greedy
            out.append(greedy[b])
            continue
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            drop[0] = False  # also when top_p rounds to 0 in fp32 (a denormal top_p dropped every token)
            probs = probs.scatter(0, idx[drop], 0.0)
            probs /= probs.sum()
        out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return out
