"""Router logits captured by hooks, Mixtral's load-balancing loss, and routing statistics.

Legend: N = tokens, B = sequences, T = tokens per sequence, E = experts, K = experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeflow.models.layers import MoeTransformer, SparseMoe, route


class RouterTap:
    """Records each MoE layer's router logits during forward passes (forward hooks on the gate Linears), so
    that neither the model code nor the expert backend needs to know about training or statistics."""

    def __init__(self, model: MoeTransformer):
        self.moes = [m for m in model.modules() if isinstance(m, SparseMoe)]
        self.logits: list[torch.Tensor] = []  # [N, E] per MoE layer, in layer order, for the last forward
        self._handles = []

    def _hook(self, module, inputs, out):
        self.logits.append(out)

    def __enter__(self) -> RouterTap:
        self._handles = [m.gate.register_forward_hook(self._hook) for m in self.moes]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def clear(self) -> None:
        self.logits = []

    @property
    def top_k(self) -> int:
        return self.moes[0].top_k

    def ids(self) -> list[torch.Tensor]:
        """The experts each token was sent to, per layer: [N, K]."""
        return [route(lg, self.top_k, False)[0] for lg in self.logits]


def balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss of one layer: E * sum_e f_e * P_e, where f_e is the share of the
    (token, slot) assignments that go to expert e and P_e its mean router probability. 1.0 when balanced;
    transformers' load_balancing_loss_func computes K times this."""
    E = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)                      # [N, E]
    ids = torch.topk(probs, k, dim=-1).indices                          # [N, K]
    f = F.one_hot(ids, E).float().mean(dim=(0, 1))                      # [E], sums to 1
    return E * (f * probs.mean(dim=0)).sum()


def usage(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Share of the (token, slot) assignments that went to each expert -> [E], sums to 1."""
    return torch.bincount(ids.flatten(), minlength=E).double() / ids.numel()


def entropy(p: torch.Tensor) -> float:
    """Natural-log entropy of a distribution; ln(E) for uniform use of E experts."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def reuse(ids: torch.Tensor, E: int) -> float:
    """How often consecutive tokens keep an expert: |S_t & S_t+1| / K averaged over the consecutive pairs
    of each row. ids [B, T, K]. Independent uniform top-K of E gives K / E (0.25 for top-2 of 8)."""
    K = ids.shape[-1]
    m = F.one_hot(ids, E).sum(dim=-2).clamp(max=1)                      # [B, T, E] chosen experts
    return float((m[:, 1:] * m[:, :-1]).sum(-1).double().mean() / K)


def routing_stats(ids_per_layer: list[torch.Tensor], E: int) -> dict:
    """Per-layer expert usage, its entropy and consecutive-token reuse, beside the uniform baselines.

    ids_per_layer: [B, T, K] per MoE layer."""
    K = ids_per_layer[0].shape[-1]
    layers = []
    for ids in ids_per_layer:
        u = usage(ids, E)
        layers.append({"usage": [round(float(x), 4) for x in u], "entropy": round(entropy(u), 4),
                       "reuse": round(reuse(ids, E), 4)})
    return {"experts": E, "top_k": K, "uniform_entropy": round(math.log(E), 4), "uniform_reuse": K / E,
            "tokens": int(ids_per_layer[0].shape[0] * ids_per_layer[0].shape[1]), "layers": layers}
