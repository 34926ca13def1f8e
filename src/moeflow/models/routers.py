"""Routers by ModelConfig.router: router logits -> (expert ids [N, K], gate weights [N, K] fp32).

Legend: N = tokens, E = experts, K = experts per token.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeflow.config import ModelConfig
from moeflow.models import fused_ops


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k (Mixtral, Qwen3, OLMoE)."""
    if fused_ops.topk_runs(logits, k):  # one launch on CUDA
        return fused_ops.softmax_topk(logits, k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    weights, ids = torch.topk(probs, k, dim=-1)    # [N, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def softmax_topk(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def topk_softmax(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, then a softmax over those k (GPT-OSS)."""
    values, ids = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1)  # [N, K]
    return ids, torch.softmax(values, dim=-1)


def _sparse_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of `masked` [N, E]; its weight is a softmax over the experts whose logit lies within 2 eps
    (relative) of that best one's. -> (ids [N, 1], weights [N, 1])"""
    best, ids = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    gates = torch.softmax(masked.masked_fill((best - scores) / factor > 2 * eps, float("-inf")), dim=-1)
    return ids, gates.gather(-1, ids)


def sparsemixer(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's inference form, top-2 (Phi-3.5-MoE, arXiv:2409.12136): the best expert, then the best of
    the rest with the first masked out; each weighted by its own masked softmax."""
    scores = logits.float()
    id1, w1 = _sparse_pick(scores, scores, cfg.router_jitter_eps)
    id2, w2 = _sparse_pick(scores, scores.scatter(-1, id1, float("-inf")), cfg.router_jitter_eps)
    return torch.cat((id1, id2), dim=-1), torch.cat((w1, w2), dim=-1)


ROUTERS: dict[str, Callable[[torch.Tensor, ModelConfig], tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": softmax_topk, "topk_softmax": topk_softmax, "sparsemixer": sparsemixer,
}
