"""GPT-OSS experts: gate/up/down biases and the clamped SwiGLU, through PyTorch on any device. The native CPU
kernel and the grouped GEMMs compute plain SiLU experts only; LocalExperts sends biased experts here explicitly.

Legend: N = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.config import ModelConfig
from moeflow.experts.ffn import each_expert


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
