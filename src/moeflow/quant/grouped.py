"""Quantized expert slots in grouped GEMMs: the slots a wave reads, dequantized together in a few batched ops
(not a dequantize and a matmul pair per expert), then the grouped GEMMs the bf16 slots run (experts/waves.py).

The batched dequantization gives the values quant/format.py's dequantize gives, bit for bit: where the scales are
in the compute dtype it works in that dtype, which is exact here ((q - z) is a small integer, its product with a
scale has at most 16 significant bits, so fp32 holds it and the one rounding is the result's), else it calls
dequantize itself.

Legend: W = slots dequantized together, I = intermediate rows, H = hidden, g = group size, G = H / g groups,
R = record bytes of a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.quant.format import ExpertFormat, dequantize

# Dequantized weights one grouped pass may hold (the GPU budget counts them: workspace_bytes); quantized waves run
# grouped only where a decode wave's slots (up to GRAPH_MAX_ENTRIES of experts/waves.py) fit in it.
DEQUANT_PASS_BYTES = 384 << 20

# The batched dequantization on the default path (False: slot by slot, for comparisons)
ENABLED = True


# The waves through the fused Triton kernels (quant/triton_moe.py, the slots read in place, any expert size) where
# they run, in place of the batched dequantization: off until measured on the GPU host.
TRITON_WAVES = False


def gemv_waves(slots: torch.Tensor, fmt: ExpertFormat | None) -> bool:
    """Decode waves (at most GEMV_MAX_TOKENS tokens) over these int4 slots run through the GEMVs of
    quant/triton_int4.py in a replayed graph, the slots read in place, whatever the expert's size (Mixtral's too,
    which no dequantized pass holds): its GEMV switch on, CUDA, a format the kernels take."""
    from moeflow.quant import triton_int4

    return (triton_int4.GEMV and fmt is not None and fmt.quantized and not fmt.biased and slots.is_cuda
            and triton_int4.supports(fmt, fmt.dtype))


def triton_waves(slots: torch.Tensor, fmt: ExpertFormat | None) -> bool:
    """Quantized waves over these slots run through the fused Triton kernels (TRITON_WAVES, CUDA, tiles that fit)."""
    from moeflow.quant import triton_moe

    return (TRITON_WAVES and fmt is not None and fmt.quantized and not fmt.biased and slots.is_cuda
            and triton_moe.triton is not None and fmt.dtype in (torch.bfloat16, torch.float16) and triton_moe.fits(fmt))


def slots_per_pass(fmt: ExpertFormat) -> int:
    """Slots of this format one pass dequantizes at most (at least 1)."""
    return max(1, DEQUANT_PASS_BYTES // (3 * fmt.inter * fmt.hidden * fmt.dtype.itemsize))


def workspace_bytes(fmt: ExpertFormat | None, entries: int, experts: int) -> int:
    """GPU bytes the dequantized weights of one grouped pass take (a temporary the GPU budget counts) where
    quantized waves of `entries` slots run dequantized, else 0. A pass holds one layer's slots: `experts` at most."""
    if not _dequantizes(fmt, entries):
        return 0
    return min(slots_per_pass(fmt), experts) * 3 * fmt.inter * fmt.hidden * fmt.dtype.itemsize


def groupable(slots: torch.Tensor, fmt: ExpertFormat | None, entries: int) -> bool:
    """Quantized slots run as grouped GEMMs: CUDA, bf16 compute, a torch with them, `entries` slots in a pass."""
    return slots.is_cuda and hasattr(torch, "_grouped_mm") and _dequantizes(fmt, entries)


def _dequantizes(fmt: ExpertFormat | None, entries: int) -> bool:
    return (ENABLED and fmt is not None and fmt.quantized and not fmt.biased and fmt.dtype == torch.bfloat16
            and slots_per_pass(fmt) >= entries)


def dequantize_into(rec: torch.Tensor, fmt: ExpertFormat, out: torch.Tensor) -> torch.Tensor:
    """Records [..., R] uint8 -> out [..., H] (its dtype): dequantize's values, in place of its fp32 temporaries
    where the scales are in out's dtype."""
    spec = fmt.spec
    if spec.scale_dtype != out.dtype:
        return out.copy_(dequantize(rec, fmt, out.dtype))
    q = rec[..., :fmt.q_bytes]
    if spec.bits == 4:
        pairs = out.unflatten(-1, (fmt.hidden // 2, 2))  # [..., H/2, 2]: even index in the low nibble
        pairs[..., 0].copy_(q & 0xF)
        pairs[..., 1].copy_(q >> 4)
    else:
        out.copy_(q)
    sd, grouped = spec.scale_dtype, out.unflatten(-1, (fmt.groups, spec.group_size))  # [..., G, g]
    scale = rec[..., fmt.q_bytes:fmt.q_bytes + fmt.scale_bytes].contiguous().view(sd)  # [..., G]
    if spec.symmetric:
        grouped.sub_(1 << (spec.bits - 1))
    else:
        grouped.sub_(rec[..., fmt.q_bytes + fmt.scale_bytes:].contiguous().view(sd)[..., None])
    return grouped.mul_(scale[..., None]).flatten(-2)


def dequantize_slots(slots: torch.Tensor, ids: torch.Tensor, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [S, block bytes] and ids [W] (a device tensor: no host sync) -> the grouped GEMMs' weights:
    gate_up [W, 2I, H], down_t [W, I, H] (views of one new [W, 3, I, H] tensor in the compute dtype)."""
    W, I, H = ids.shape[0], fmt.inter, fmt.hidden
    rec = slots.index_select(0, ids).view(W, 3, I, fmt.record)
    w = dequantize_into(rec, fmt, torch.empty(W, 3, I, H, dtype=fmt.dtype, device=slots.device))
    return w[:, :2].reshape(W, 2 * I, H), w[:, 2]


def cut_passes(passes: list[list[int]], most: int) -> list[list[int]]:
    """Passes (lists of indices) cut further into pieces of at most `most` slots."""
    return [p[i:i + most] for p in passes for i in range(0, len(p), most)]


def entry_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks: torch.Tensor,
                  fmt: ExpertFormat) -> torch.Tensor:
    """A layer's experts on a few tokens (decode) without a host sync: each routing entry's expert dequantized
    (one two entries pick, twice) in one batched op, then batched matrix-vector products.

    x [N, H], topk_ids/topk_weights [N, K], blocks [E, block] one layer's quantized experts -> [N, H]."""
    N, K = topk_ids.shape
    gate_up, down_t = dequantize_slots(blocks, topk_ids.flatten(), fmt)  # [N K, 2I, H], [N K, I, H]
    xs = x.repeat_interleave(K, dim=0)[:, None]                             # [N K, 1, H]
    gate, up = torch.bmm(xs, gate_up.transpose(1, 2)).chunk(2, dim=-1)      # [N K, 1, I] each
    y = torch.bmm(F.silu(gate) * up, down_t).view(N, K, -1)                 # [N, K, H]
    return (y.float() * topk_weights.float()[..., None]).sum(1).to(x.dtype)


def gemv_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, blocks: torch.Tensor,
                 fmt: ExpertFormat) -> torch.Tensor:
    """A layer's int4 experts at decode through the wave GEMVs (quant/triton_int4.py), each routing entry a slot
    of its own: no sort, no host sync. x [N, H], topk_ids/topk_weights [N, K], blocks [E, block] -> [N, H]."""
    from moeflow.quant import triton_int4

    N, K = topk_ids.shape
    M, dev = N * K, x.device
    entries = torch.arange(M + 1, dtype=torch.int32, device=dev)
    meta = torch.cat([entries[:M], entries[1:], topk_weights.float().reshape(-1).view(torch.int32),
                      topk_ids.reshape(-1).to(torch.int32)])  # entries, their ends, weights, slots: one each
    out = torch.zeros(N, fmt.hidden, dtype=torch.float32, device=dev)
    triton_int4.wave_gemv(out, x, meta, M, M, K, blocks, fmt, 1)
    return out.to(x.dtype)


def fused_wave(out: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, M: int, W: int, K: int,
               slots: torch.Tensor, fmt: ExpertFormat) -> None:
    """out [N, H] fp32 += a quantized wave's entries through the fused Triton kernels, the slots read in place.
    meta [M + W + M + W] int32: the entries sorted by slot, the cumulative entries per slot, their weights (fp32
    bits), the slots' ids (experts/waves.py)."""
    from moeflow.quant import triton_moe

    offs, ids = meta[M:M + W], meta[2 * M + W:].long()
    group = torch.searchsorted(offs, torch.arange(M, dtype=torch.int32, device=x.device), right=True)  # [M]
    tok = meta[:M].long() // K
    w = meta[M + W:2 * M + W].view(torch.float32)[:, None]  # [M, 1]: each entry a "token" of one expert
    y = triton_moe.quantized_fused_experts(x[tok], ids[group][:, None], w, slots, fmt, out_dtype=torch.float32)
    out.index_add_(0, tok, y)
