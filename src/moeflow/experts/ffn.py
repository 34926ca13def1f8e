"""The expert FFN's maths (SiLU-gated), shared by every backend: one expert, a row range of one, and a
layer's experts looped or in grouped GEMMs.

Legend: n = an expert's tokens, N = tokens, K = experts per token, H = hidden, I = intermediate rows,
E = experts, M = routing entries (N x K) sorted by expert, G = experts in a grouped GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeflow.quant.format import ExpertFormat


def expert_rows(block: torch.Tensor, inter: int, r0: int, r1: int) -> tuple[torch.Tensor, ...]:
    """Rows r0:r1 of the intermediate dimension of one expert block [3IH] in the host layout (down transposed):
    (gate, up, down_t), each [r1-r0, H] and contiguous."""
    H = block.shape[-1] // (3 * inter)
    m = block.view(3, inter, H)
    return m[0, r0:r1], m[1, r0:r1], m[2, r0:r1]


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x [n, H], gate_up [2I, H], down_t [I, H] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return (F.silu(gate) * up) @ down_t


def partial_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """Rows r0:r1 of an expert's intermediate dimension: x [n, H], gate/up/down_t [r, H] -> [n, H].
    The partial outputs of disjoint row ranges sum to the expert's output."""
    return (F.silu(F.linear(x, gate)) * F.linear(x, up)) @ down_t


def block_ffn(inter: int, fmt: ExpertFormat | None = None):
    """ffn(x [n, H], block [3IH] in the host layout, or a block of `fmt`) -> [n, H]: one whole expert as the
    engine runs it (a quantized block: quantized_ffn; a biased one: experts/biased.py)."""
    if fmt is not None and fmt.biased:
        return fmt.ffn

    def ffn(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if fmt is not None and fmt.quantized:
            return quantized_ffn(x, block, fmt)
        return partial_ffn(x, *expert_rows(block, inter, 0, inter))

    return ffn


def group_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Sort the (token, slot) pairs by expert: one host sync gives each expert's token count.

    Returns (order [N*K] flat indices into topk_ids grouped by expert, counts list[E])."""
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, counts


def grouped_ffn(x: torch.Tensor, gate_up: torch.Tensor, down_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert through their experts in two grouped GEMMs (CUDA bf16).

    x [M, H] sorted by group, gate_up [G, 2I, H], down_t [G, I, H], offs [G] int32 cumulative rows -> [M, H]."""
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)             # [M, 2I]
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down_t, offs=offs)


def grouped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gate_up: torch.Tensor, down_t: torch.Tensor, bias: torch.Tensor | None = None,
                    fmt=None) -> torch.Tensor:
    """All experts of a layer in two grouped GEMMs and no host sync (CUDA bf16).

    x [N, H], gate_up [E, 2I, H], down_t [E, I, H] -> [N, H]; biased experts: bias [E, 2I + H] and their
    format (experts/biased.py BiasedFormat)."""
    N, K = topk_ids.shape
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)                                  # [N*K] grouped by expert
    # scatter_add, not bincount: bincount syncs with the host on CUDA to size its output
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    offs = counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
    tok = order // K
    y = (grouped_ffn(x[tok], gate_up, down_t, offs) if bias is None                  # [N*K, H]
         else fmt.grouped_ffn(x[tok], gate_up, down_t, bias, offs))
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * topk_weights.flatten()[order, None].float())
    return out.to(x.dtype)


def each_expert(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                ffn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ffn(e, x_e [n, H]) -> [n, H] on each selected expert's tokens, one expert after the other, summed with the
    routing weights in fp32 (any device and dtype; one host sync). x [N, H], topk_* [N, K] -> [N, H]."""
    N, K = topk_ids.shape
    order, counts = group_by_expert(topk_ids, num_experts)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    flat_w, start = topk_weights.flatten(), 0
    for e, n in enumerate(counts):
        if n:
            idx = order[start:start + n]
            start += n
            tok = idx // K
            out.index_add_(0, tok, ffn(e, x[tok]).float() * flat_w[idx, None].float())
    return out.to(x.dtype)


def looped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   gate_up: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """Each selected expert on its tokens. x [N, H], gate_up [E, 2I, H], down_t [E, I, H] -> [N, H]."""
    return each_expert(x, topk_ids, topk_weights, gate_up.shape[0],
                       lambda e, xe: expert_ffn(xe, gate_up[e], down_t[e]))


def can_group(x: torch.Tensor) -> bool:
    """Grouped GEMMs run on x's device and dtype (CUDA bf16, a torch that has them)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def quantized_ffn(x: torch.Tensor, block: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """One whole expert of a quantized block on x [n, H] -> [n, H]: the int4 Triton kernel where it runs (CUDA,
    bf16/fp16), else its rows dequantized and the dense FFN."""
    from moeflow.quant import triton_int4

    if triton_int4.available(x, fmt):
        return triton_int4.int4_ffn(x, block, fmt).to(x.dtype)
    return partial_ffn(x, *fmt.rows(block, 0, fmt.inter, x.dtype))


def quantized_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks: torch.Tensor,
                      fmt: ExpertFormat) -> torch.Tensor:
    """Each selected expert dequantized, then on its tokens: the fallback of quantized stores on any device.

    x [N, H], blocks [E, block] one layer's quantized experts -> [N, H]."""
    return each_expert(x, topk_ids, topk_weights, blocks.shape[0], lambda e, xe: quantized_ffn(xe, blocks[e], fmt))
