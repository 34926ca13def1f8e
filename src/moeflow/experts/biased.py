"""GPT-OSS experts: gate/up/down biases and the clamped SwiGLU, through PyTorch on any device. On the CPU,
bf16 biased blocks run in the native kernel (csrc/cpu_experts.cpp, its vector paths), this maths in fp32;
other dtypes, or MOEFLOW_CPU_KERNEL=torch, through BiasedFormat.ffn.

A biased block is the plain one [gate | up | down_t] followed by its biases [gate (I) | up (I) | down (H)].
Rows r0:r1 of an expert carry their gate and up biases; the down bias belongs to the part that holds row 0
(the CPU's share of a split expert), so that the parts still sum to the whole. A GPU slot that received rows
r:I only has its gate rows and gate biases 0:r and its down bias zeroed (clear): the clamped SwiGLU of a zero
gate is zero, as SiLU's is.

Legend: n = an expert's tokens, N = tokens, K = experts per token, E = experts, H = hidden, I = expert
intermediate, R = rows, M = routing entries sorted by group, G = experts (slots) in a grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.config import ModelConfig
from moeflow.experts.ffn import each_expert
from moeflow.quant.format import ExpertFormat


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation: gate clamped above at `limit`, up within +-limit, (up + 1) * gate * sigmoid(alpha gate)."""
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def biased_ffn(x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, bias: torch.Tensor,
               cfg: ModelConfig) -> torch.Tensor:
    """One expert: x [n, H], gate_up [2I, H], down_t [I, H], bias [2I + H] (gate, up, down) -> [n, H]."""
    I = cfg.expert_intermediate_size
    gate, up = (F.linear(x, gate_up) + bias[:2 * I]).chunk(2, dim=-1)       # [n, I] each
    return clamped_swiglu(gate, up, cfg.swiglu_alpha, cfg.swiglu_limit) @ down_t + bias[2 * I:]


def biased_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                   down_t: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Each selected expert on its tokens. x [N, H], gate_up [E, 2I, H], down_t [E, I, H], bias [E, 2I + H]
    -> [N, H]."""
    return each_expert(x, topk_ids, topk_weights, gate_up.shape[0],
                       lambda e, xe: biased_ffn(xe, gate_up[e], down_t[e], bias[e], cfg))


def biased_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                 down_t: torch.Tensor, bias: torch.Tensor, fmt: BiasedFormat, cfg: ModelConfig,
                 grouped: bool) -> torch.Tensor:
    """One layer's experts (views as biased_experts takes them): grouped GEMMs where asked and the blocks take
    them, else each expert in PyTorch -> [N, H]."""
    from moeflow.experts.ffn import grouped_experts

    if grouped and fmt.groupable:
        return grouped_experts(x, topk_ids, topk_weights, gate_up, down_t, bias, fmt)
    return biased_experts(x, topk_ids, topk_weights, gate_up, down_t, bias, cfg)


class BiasedFormat(ExpertFormat):
    """The block layout of a biased expert (dense, in `dtype`), with the activation's alpha and limit."""

    biased = True

    def __init__(self, inter: int, hidden: int, dtype: torch.dtype, alpha: float, limit: float):
        super().__init__(inter, hidden, dtype)
        self.alpha, self.limit = alpha, limit

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype) -> BiasedFormat:
        return cls(cfg.expert_intermediate_size, cfg.hidden_size, dtype, cfg.swiglu_alpha, cfg.swiglu_limit)

    @property
    def matrix_numel(self) -> int:
        return 3 * self.inter * self.hidden

    @property
    def block_numel(self) -> int:
        return self.matrix_numel + 2 * self.inter + self.hidden

    @property
    def block_bytes(self) -> int:
        return self.block_numel * self.storage_dtype.itemsize

    @property
    def groupable(self) -> bool:
        """Grouped GEMMs take views of these blocks: every expert's matrices 16-byte aligned (a CUDA requirement)."""
        return all(n * self.storage_dtype.itemsize % 16 == 0 for n in (self.block_numel, self.hidden, self.inter))

    def bias(self, block: torch.Tensor) -> torch.Tensor:
        """[2I + H] the biases of a block: gate, up, down."""
        return block[self.matrix_numel:]

    def rows(self, block: torch.Tensor, r0: int, r1: int, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, ...]:
        """Rows r0:r1 of the matrices: (gate, up, down_t) [R, H] each, views."""
        m = block[:self.matrix_numel].view(3, self.inter, self.hidden)
        return m[0, r0:r1], m[1, r0:r1], m[2, r0:r1]

    def runs(self, block: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Rows r0:r1 as stored: the three matrices' runs [R, H], then the gate and up biases' [R]."""
        b = self.bias(block)
        return (*self.rows(block, r0, r1), b[r0:r1], b[self.inter + r0:self.inter + r1])

    def clear(self, block: torch.Tensor, r: int) -> None:
        """A slot that got rows r:I only: gate rows and gate biases 0:r zeroed, and the down bias (the CPU's part,
        which holds row 0, adds it)."""
        b = self.bias(block)
        self.rows(block, 0, r)[0].zero_()
        b[:r].zero_()
        b[2 * self.inter:].zero_()

    def ffn(self, x: torch.Tensor, block: torch.Tensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (default all) of one expert on x [n, H] -> [n, H]; the down bias where r0 = 0."""
        r1 = self.inter if r1 is None else r1
        gate, up, down_t = self.rows(block, r0, r1)
        b = self.bias(block)
        g = F.linear(x, gate) + b[r0:r1]                                          # [n, R]
        u = F.linear(x, up) + b[self.inter + r0:self.inter + r1]
        y = clamped_swiglu(g, u, self.alpha, self.limit) @ down_t                  # [n, H]
        return y + b[2 * self.inter:] if r0 == 0 else y

    def grouped_ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, bias: torch.Tensor,
                    offs: torch.Tensor) -> torch.Tensor:
        """experts/ffn.py grouped_ffn with biases: x [M, H] sorted by group, gate_up [G, 2I, H], down_t [G, I, H],
        bias [G, 2I + H], offs [G] int32 cumulative rows -> [M, H]. No host sync (CUDA graphs capture it)."""
        I = self.inter
        group = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device, dtype=offs.dtype), right=True)
        b = bias[group.clamp(max=bias.shape[0] - 1)]                                # [M, 2I + H]
        h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs) + b[:, :2 * I]  # [M, 2I]
        act = clamped_swiglu(h[:, :I], h[:, I:], self.alpha, self.limit)
        return torch._grouped_mm(act, down_t, offs=offs) + b[:, 2 * I:]
