"""Which experts stay resident: a popularity profile per (MoE layer, expert), from a routing trace or from
running prompts through the model, saved as JSON for `--placement`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.experts.trace import RoutingRecorder  # noqa: F401  (importable here as before)


@dataclass
class Placement:
    model: str
    counts: torch.Tensor  # [L, E] selections of each expert of each MoE layer

    def check(self, model: str, cfg: ModelConfig) -> None:
        L, E = len(cfg.moe_layers), cfg.num_experts
        if tuple(self.counts.shape) != (L, E):
            raise MoeflowError(f"the placement file is for {self.model} ({self.counts.shape[0]} MoE layers x "
                               f"{self.counts.shape[1]} experts) but {model} has {L} x {E}")

    def resident(self, n: int) -> list[tuple[int, int]]:
        """The n most used experts over all layers (ties: lower layer, then lower expert)."""
        L, E = self.counts.shape
        order = sorted(range(L * E), key=lambda i: (-float(self.counts.view(-1)[i]), i))
        return [(i // E, i % E) for i in order[:n]]

    def rates(self, top_k: int) -> dict[tuple[int, int], float]:
        """(l, e) -> how often expert e of MoE layer l is picked per token (layer l's selections / top_k
        tokens)."""
        tokens = self.counts.sum(dim=1, keepdim=True).clamp(min=1) / top_k  # [L, 1]
        r = (self.counts / tokens).tolist()
        return {(li, e): v for li, row in enumerate(r) for e, v in enumerate(row)}

    def save(self, path: str | Path) -> None:
        L, E = self.counts.shape
        Path(path).write_text(json.dumps({"model": self.model, "moe_layers": L, "experts": E,
                                          "counts": self.counts.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        try:
            d = json.loads(Path(path).read_text())
            counts = torch.tensor(d["counts"], dtype=torch.float64)
            assert counts.dim() == 2
            return cls(str(d["model"]), counts)
        except FileNotFoundError:
            raise MoeflowError(f"placement file {path} does not exist") from None
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise MoeflowError(f"placement file {path} is not a moeflow placement ({e})") from None


def even_rates(layers: int, experts: int, top_k: int) -> dict[tuple[int, int], float]:
    """No profile: every expert picked as often (top_k / experts per token)."""
    return {(li, e): top_k / experts for li in range(layers) for e in range(experts)}


def even_resident(n: int, layers: int, experts: int) -> list[tuple[int, int]]:
    """No profile: spread n resident experts evenly over the layers (experts 0, 1, ... of each)."""
    return [(i % layers, i // layers) for i in range(min(n, layers * experts))]
