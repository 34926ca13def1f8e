"""Routers, one registry for every architecture: a Router is built once per MoE block from ModelConfig.router
and maps the router logits (and the gate module, for routers that read its parameters) to each token's experts.

Legend: N = tokens, E = routed experts, G = expert groups, K = experts per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from moeflow import MoeflowError
from moeflow.config import ModelConfig
import moeflow.models.fused_ops as fused_ops

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class Router(ABC):
    """logits [N, E] and the gate module -> (expert ids [N, K], gate weights [N, K] fp32)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @abstractmethod
    def __call__(self, logits: torch.Tensor, gate: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ...


ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    def add(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls
    return add


def make_router(cfg: ModelConfig) -> Router:
    if cfg.router not in ROUTERS:
        raise MoeflowError(f"unknown router {cfg.router!r} (model_type {cfg.model_type!r}); "
                           f"moeflow has {', '.join(sorted(ROUTERS))}")
    return ROUTERS[cfg.router](cfg)


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k (Mixtral, Qwen3, OLMoE)."""
    if fused_ops.topk_runs(logits, k):  # one launch on CUDA
        return fused_ops.softmax_topk(logits, k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    weights, ids = torch.topk(probs, k, dim=-1)    # [N, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


@register("softmax_topk")
class SoftmaxTopK(Router):
    def __call__(self, logits, gate=None):
        return route(logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)


@register("topk_softmax")
class TopKSoftmax(Router):
    """Top-k of the logits, then a softmax over those k (GPT-OSS)."""

    def __call__(self, logits, gate=None):
        values, ids = torch.topk(logits.float(), self.cfg.num_experts_per_tok, dim=-1)  # [N, K]
        return ids, torch.softmax(values, dim=-1)


def _sparse_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of `masked` [N, E]; its weight is a softmax over the experts whose logit lies within 2 eps
    (relative) of that best one's. -> (ids [N, 1], weights [N, 1])"""
    best, ids = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    gates = torch.softmax(masked.masked_fill((best - scores) / factor > 2 * eps, float("-inf")), dim=-1)
    return ids, gates.gather(-1, ids)


@register("sparsemixer")
class SparseMixer(Router):
    """SparseMixer's inference form, top-2 (Phi-3.5-MoE, arXiv:2409.12136): the best expert, then the best of
    the rest with the first masked out; each weighted by its own masked softmax."""

    def __call__(self, logits, gate=None):
        scores, eps = logits.float(), self.cfg.router_jitter_eps
        id1, w1 = _sparse_pick(scores, scores, eps)
        id2, w2 = _sparse_pick(scores, scores.scatter(-1, id1, float("-inf")), eps)
        return torch.cat((id1, id2), dim=-1), torch.cat((w1, w2), dim=-1)


def check_routing(cfg_name: str, method: str, scoring: str, experts: int, n_group: int, topk_group: int,
                  methods: tuple[str, ...], scorings: tuple[str, ...]) -> None:
    """One-line errors for routing options an architecture does not implement, or groups that cannot work."""
    if method not in methods:
        raise MoeflowError(f"unsupported topk_method {method!r} in config.json (model_type {cfg_name!r}); "
                           f"moeflow supports {', '.join(repr(m) for m in methods)}")
    if scoring not in scorings:
        raise MoeflowError(f"unsupported scoring_func {scoring!r} in config.json (model_type {cfg_name!r}); "
                           f"moeflow supports {', '.join(repr(s) for s in scorings)}")
    if method != "greedy" and (n_group < 1 or experts % n_group or not 1 <= topk_group <= n_group):
        raise MoeflowError(f"topk_method {method!r} needs n_group dividing the {experts} experts and "
                           f"1 <= topk_group <= n_group; config.json has n_group {n_group}, topk_group {topk_group}")
    if method == "noaux_tc" and experts // n_group < 2:
        raise MoeflowError(f"topk_method 'noaux_tc' ranks groups by their two best experts: n_group {n_group} "
                           f"leaves fewer than two of the {experts} experts per group")


@register("grouped_topk")
class GroupedTopK(Router):
    """DeepSeek's: softmax (V2) or sigmoid (V3) scores; greedy top-k over all experts, or within the groups
    group_limited_greedy keeps (the topk_group of the highest expert score), or noaux_tc's (ranked by their two
    best scores plus the gate's e_score_correction_bias, which steers the choice, not the weights)."""

    def __call__(self, logits, gate=None):
        cfg = self.cfg
        scores = logits.float().sigmoid() if cfg.scoring == "sigmoid" else logits.float().softmax(dim=-1)  # [N, E]
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = scores + gate.e_score_correction_bias.float()
        if cfg.topk_method != "greedy":
            choice = self._in_best_groups(choice)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices                  # [N, K]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor

    def _in_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [N, E] with the experts outside each token's topk_group best groups masked to -inf."""
        N, E = choice.shape
        G = self.cfg.n_group
        grouped = choice.view(N, G, E // G)
        if self.cfg.topk_method == "group_limited_greedy":
            group_score = grouped.max(dim=-1).values                                 # [N, G]
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_score.topk(self.cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        return choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
