"""DeepSeek's routers: softmax (V2) or sigmoid (V3) scores, top-k over all experts or within the best groups.

Legend: N = tokens, E = routed experts, G = expert groups, K = experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow import MoeflowError
from moeflow.config import ModelConfig

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


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


class GroupedTopK:
    """A plain object (SparseMoe.router): logits [N, E] and the gate module -> ids [N, K], weights [N, K] fp32.
    group_limited_greedy keeps the topk_group groups of the highest expert score; noaux_tc ranks groups by their
    two best scores plus e_score_correction_bias (a gate parameter), which steers the choice, not the weights."""

    def __init__(self, cfg: ModelConfig):
        self.k, self.method, self.sigmoid = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring == "sigmoid"
        self.groups, self.topk_group = cfg.n_group, cfg.topk_group
        self.normalize, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def __call__(self, logits: torch.Tensor, gate: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.float().sigmoid() if self.sigmoid else logits.float().softmax(dim=-1)  # [N, E]
        choice = scores
        if self.method == "noaux_tc":
            choice = scores + gate.e_score_correction_bias.float()
        if self.method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, self.groups, E // self.groups)
            if self.method == "group_limited_greedy":
                group_score = grouped.max(dim=-1).values                       # [N, G]
            else:
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
            best = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            keep = keep.repeat_interleave(E // self.groups, dim=1)              # [N, E]
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = choice.topk(self.k, dim=-1).indices                               # [N, K]
        weights = scores.gather(1, ids)
        if self.normalize and self.k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale
