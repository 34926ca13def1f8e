"""All routed experts of a model in one tensor, each expert one contiguous block.

One block per expert means copying an expert to another device is one transfer, and one big
allocation can be pinned at once (per-expert pinned tensors waste memory to power-of-two rounding).
Block layout: [gate (I x H) | up (I x H) | down (H x I)], so gate and up form one fused [2I, H] matrix.
"""

from __future__ import annotations

import torch

from moeflow.config import ModelConfig
from moeflow.models.base import EXPERT_PARTS


class ExpertStore:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 data: torch.Tensor | None = None):
        self.cfg, self.layers = cfg, cfg.moe_layers
        self.slot = {layer: i for i, layer in enumerate(self.layers)}  # model layer -> row of data
        shape = (len(self.layers), cfg.num_experts, cfg.expert_numel)
        self.data = torch.empty(shape, dtype=dtype, device=device) if data is None else data  # [L, E, 3IH]
        assert tuple(self.data.shape) == shape, (tuple(self.data.shape), shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def part_shape(self, part: str) -> tuple[int, int]:
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        return (H, I) if part == "down" else (I, H)

    def part(self, layer: int, expert: int, part: str) -> torch.Tensor:
        """A view of one matrix of one expert, in the published [out, in] orientation."""
        n = self.cfg.expert_intermediate_size * self.cfg.hidden_size
        i = EXPERT_PARTS.index(part)
        return self.data[self.slot[layer], expert, i * n:(i + 1) * n].view(self.part_shape(part))

    def gate_up(self, layer: int) -> torch.Tensor:
        """[E, 2I, H] view of one layer's fused gate and up projections."""
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        return self.data[self.slot[layer], :, :2 * I * H].view(-1, 2 * I, H)

    def down(self, layer: int) -> torch.Tensor:
        """[E, H, I] view of one layer's down projections."""
        I, H = self.cfg.expert_intermediate_size, self.cfg.hidden_size
        return self.data[self.slot[layer], :, 2 * I * H:].view(-1, H, I)
