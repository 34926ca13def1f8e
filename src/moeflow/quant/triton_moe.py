"""A layer's routed int4/int8 experts (quant/format.py blocks) in two Triton launches, dequantizing in the
GEMMs: experts/fused_moe.py's routing-sorted blocks over quantized weights, in place of one launch pair per
expert (quant/triton_int4.py).

A weight tile spans one quantization group along H (2 HALF = g columns), so each row of a tile has one scale
(and zero point). As in triton_int4, the even and odd columns are taken apart rather than interleaved: int4
holds them in the low and high nibbles of a byte, int8 in consecutive bytes. gate_up reads x's even and odd
columns against them; down writes y's even and odd columns.

Legend: M = routing pairs, H = hidden, I = intermediate rows, g = group size, R = record bytes of a row,
BM = pairs a block, BN = weight rows a gate_up program, BK = rows of I a down step.
"""

from __future__ import annotations

import torch

from moeflow.experts import fused_moe

triton = fused_moe.triton
if triton is not None:
    import triton.language as tl

    from moeflow.experts.fused_moe import _silu_mul


def fits(fmt) -> bool:
    """A quantized format whose tiles fit: groups a power of two, I a multiple of 16."""
    spec = fmt.spec
    return spec is not None and fmt.inter % 16 == 0 and spec.group_size & (spec.group_size - 1) == 0


def available(x: torch.Tensor, fmt) -> bool:
    """The kernels run on x (bf16/fp16 on CUDA, Triton importable) for blocks of this format."""
    return fused_moe.available(x) and fits(fmt)


if triton is not None:
    @triton.jit
    def _half(p, BF16: tl.constexpr):
        """Scales or zero points at byte pointers p, stored in bf16 or fp16, as fp32."""
        if BF16:
            v = tl.load(p.to(tl.pointer_type(tl.bfloat16))).to(tl.float32)
        else:
            v = tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)
        return v

    @triton.jit
    def _qtile(base, rows, k0, R, QB, SB, BITS: tl.constexpr, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr,
               HALF: tl.constexpr):
        """Rows `rows` of a block's records, columns k0 : k0 + 2 HALF (one group): (even, odd) [rows, HALF] fp32."""
        j = tl.arange(0, HALF)
        r = base + rows[:, None] * R
        if BITS == 4:
            q = tl.load(r + k0 // 2 + j[None, :]).to(tl.int32)
            qe, qo = q & 15, q >> 4
        else:
            qe = tl.load(r + k0 + 2 * j[None, :]).to(tl.int32)
            qo = tl.load(r + k0 + 2 * j[None, :] + 1).to(tl.int32)
        sp = base + rows * R + QB + 2 * (k0 // (2 * HALF))
        s = _half(sp, SCALE_BF16)
        if ASYM:
            z = _half(sp + SB, SCALE_BF16)
        else:
            z = s * 0.0 + (1 << (BITS - 1))
        return (qe.to(tl.float32) - z[:, None]) * s[:, None], (qo.to(tl.float32) - z[:, None]) * s[:, None]

    @triton.jit
    def _qgate_up_kernel(x_ptr, blk_ptr, h_ptr, sorted_ptr, bexp_ptr, total_ptr, M, TOPK, H, I, BLOCK, R, QB, SB,
                         BITS: tl.constexpr, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, HALF: tl.constexpr):
        """h[pair, n] = silu(x[tok] . gate[e, n]) * (x[tok] . up[e, n]) for a block of pairs and BN rows n."""
        pid = tl.program_id(0)
        num_n = I // BN
        pid_m, pid_n = pid // num_n, pid % num_n
        if pid_m * BM >= tl.load(total_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
        valid = pair < M
        tok = (pair // TOPK).to(tl.int64)
        base = blk_ptr + tl.load(bexp_ptr + pid_m).to(tl.int64) * BLOCK
        rows = pid_n * BN + tl.arange(0, BN)
        j = tl.arange(0, HALF)
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, H, 2 * HALF):
            xp = x_ptr + tok[:, None] * H + k0 + 2 * j[None, :]
            xe = tl.load(xp, mask=valid[:, None], other=0.0)
            xo = tl.load(xp + 1, mask=valid[:, None], other=0.0)
            glo, ghi = _qtile(base, rows, k0, R, QB, SB, BITS, ASYM, SCALE_BF16, HALF)
            ulo, uhi = _qtile(base, rows + I, k0, R, QB, SB, BITS, ASYM, SCALE_BF16, HALF)
            # weights rounded to the activations' dtype, as the fallback's dequantized rows are
            acc_g = tl.dot(xe, tl.trans(glo.to(xe.dtype)), acc_g)
            acc_g = tl.dot(xo, tl.trans(ghi.to(xe.dtype)), acc_g)
            acc_u = tl.dot(xe, tl.trans(ulo.to(xe.dtype)), acc_u)
            acc_u = tl.dot(xo, tl.trans(uhi.to(xe.dtype)), acc_u)
        h = _silu_mul(acc_g, acc_u, h_ptr.dtype.element_ty)
        tl.store(h_ptr + pair.to(tl.int64)[:, None] * I + rows[None, :], h,
                 mask=valid[:, None])

    @triton.jit
    def _qdown_kernel(h_ptr, blk_ptr, y_ptr, wts_ptr, sorted_ptr, bexp_ptr, total_ptr, M, H, I, BLOCK, R, QB, SB,
                      BITS: tl.constexpr, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr):
        """y[pair, c] = weight[pair] * (h[pair] . down_t[e, :, c]) over one group of columns c (fp32)."""
        pid = tl.program_id(0)
        num_n = H // (2 * HALF)
        pid_m, pid_n = pid // num_n, pid % num_n
        if pid_m * BM >= tl.load(total_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        valid = pair < M
        base = blk_ptr + tl.load(bexp_ptr + pid_m).to(tl.int64) * BLOCK
        k0 = pid_n * 2 * HALF
        ks = tl.arange(0, BK)
        acc_e = tl.zeros((BM, HALF), tl.float32)
        acc_o = tl.zeros((BM, HALF), tl.float32)
        for i0 in range(0, I, BK):
            hv = tl.load(h_ptr + pair[:, None] * I + i0 + ks[None, :], mask=valid[:, None], other=0.0)
            lo, hi = _qtile(base, 2 * I + i0 + ks, k0, R, QB, SB, BITS, ASYM, SCALE_BF16, HALF)
            acc_e = tl.dot(hv, lo.to(hv.dtype), acc_e)
            acc_o = tl.dot(hv, hi.to(hv.dtype), acc_o)
        w = tl.load(wts_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        yp = y_ptr + pair[:, None] * H + k0 + 2 * tl.arange(0, HALF)[None, :]
        tl.store(yp, acc_e.to(h_ptr.dtype.element_ty).to(tl.float32) * w, mask=valid[:, None])
        tl.store(yp + 1, acc_o.to(h_ptr.dtype.element_ty).to(tl.float32) * w, mask=valid[:, None])


def quantized_fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            blocks: torch.Tensor, fmt, bm: int | None = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """All routed experts of a layer from quantized blocks in two launches (CUDA, bf16/fp16, no host sync).

    x [N, H], topk_ids/topk_weights [N, K], blocks [E, block bytes] one layer's experts (or a wave's slots, ids
    the entries' slots with K = 1) -> [N, H] in out_dtype (default x's)."""
    N, K = topk_ids.shape
    E, H, I, spec = blocks.shape[0], fmt.hidden, fmt.inter, fmt.spec
    M = N * K
    bm = bm or fused_moe.tiles_for(M, E).bm
    sorted_ids, block_expert, total = fused_moe.align_on_device(topk_ids, E, bm)
    x = x.contiguous()
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    y = torch.empty(M, H, dtype=torch.float32, device=x.device)
    nblocks = sorted_ids.numel() // bm
    bn = 32 if I % 32 == 0 else 16
    common = (M, H, I, blocks.stride(0), fmt.record, fmt.q_bytes, fmt.scale_bytes)
    flags = dict(BITS=spec.bits, ASYM=not spec.symmetric, SCALE_BF16=spec.scale_dtype == torch.bfloat16,
                 BM=bm, HALF=spec.group_size // 2, num_warps=4)
    _qgate_up_kernel[(nblocks * (I // bn),)](x, blocks, h, sorted_ids, block_expert, total, M, K, *common[1:],
                                             BN=bn, **flags)
    _qdown_kernel[(nblocks * (H // spec.group_size),)](h, blocks, y, topk_weights.contiguous(), sorted_ids,
                                                       block_expert, total, *common, BK=bn, **flags)
    return fused_moe.topk_sum(y, N, K, out_dtype or x.dtype)
