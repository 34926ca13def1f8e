"""Triton kernels for one int4 expert (quant/format.py blocks) on its tokens, dequantizing inside the GEMMs.

Two kernels, as the FFN's two GEMMs: gate_up computes h = silu(x gate^T) * (x up^T) [n, I], reading gate and up
rows a group at a time; down computes y = h down_t [n, H], a group of H columns at a time. A tile spans one
quantization group along H (BK = g), so each row of a tile has one scale (and zero point). The packed bytes hold
the even columns in their low nibbles and the odd ones in their high: the kernels never interleave, they take the
even and odd columns of x (gate_up) or of y (down) apart. Small token counts (decode) pad to 16 rows, the
smallest tl.dot. Used where Triton is importable on a CUDA device; the PyTorch dequantize-then-matmul fallback
(quant/format.py rows) elsewhere.

Legend: n = tokens, H = hidden, I = intermediate rows, g = group size, R = record bytes of a row.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs): the fallback runs
    triton = None


def available(x: torch.Tensor, fmt) -> bool:
    """An int4 block on a CUDA device with bf16/fp16 activations (fp32 runs take the fallback, exactly), of
    shapes the tiles divide."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and
            fmt.spec is not None and fmt.spec.bits == 4 and fmt.inter % 16 == 0)


if triton is not None:
    @triton.jit
    def _tile(rec_ptr, rows, k0, R, QB, SB, ASYM: tl.constexpr, HALF: tl.constexpr, SCALE_BF16: tl.constexpr):
        """Rows `rows` of a matrix's records, columns k0 : k0 + 2 HALF: (even, odd) dequantized [len(rows), HALF]."""
        cols = k0 // 2 + tl.arange(0, HALF)
        q = tl.load(rec_ptr + rows[:, None] * R + cols[None, :]).to(tl.int32)
        g = k0 // (2 * HALF)
        sp = rec_ptr + rows * R + QB + 2 * g
        if SCALE_BF16:
            s = tl.load(sp.to(tl.pointer_type(tl.bfloat16))).to(tl.float32)
        else:
            s = tl.load(sp.to(tl.pointer_type(tl.float16))).to(tl.float32)
        if ASYM:
            zp = rec_ptr + rows * R + QB + SB + 2 * g
            if SCALE_BF16:
                z = tl.load(zp.to(tl.pointer_type(tl.bfloat16))).to(tl.float32)
            else:
                z = tl.load(zp.to(tl.pointer_type(tl.float16))).to(tl.float32)
        else:
            z = s * 0.0 + 8.0
        lo = ((q & 15).to(tl.float32) - z[:, None]) * s[:, None]
        hi = ((q >> 4).to(tl.float32) - z[:, None]) * s[:, None]
        return lo, hi

    @triton.jit
    def _gate_up_kernel(x_ptr, blk_ptr, h_ptr, n, H, I, R, QB, SB, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr,
                        BN: tl.constexpr, BI: tl.constexpr, HALF: tl.constexpr):
        pid_n, pid_i = tl.program_id(0), tl.program_id(1)
        toks = pid_n * BN + tl.arange(0, BN)
        rows = pid_i * BI + tl.arange(0, BI)
        tmask = toks < n
        acc_g = tl.zeros((BN, BI), tl.float32)
        acc_u = tl.zeros((BN, BI), tl.float32)
        j = tl.arange(0, HALF)
        for k0 in range(0, H, 2 * HALF):
            xe = tl.load(x_ptr + toks[:, None] * H + k0 + 2 * j[None, :], mask=tmask[:, None], other=0.0)
            xo = tl.load(x_ptr + toks[:, None] * H + k0 + 2 * j[None, :] + 1, mask=tmask[:, None], other=0.0)
            glo, ghi = _tile(blk_ptr, rows, k0, R, QB, SB, ASYM, HALF, SCALE_BF16)
            ulo, uhi = _tile(blk_ptr, rows + I, k0, R, QB, SB, ASYM, HALF, SCALE_BF16)
            # weights rounded to the activations' dtype, as the fallback's dequantized rows are
            acc_g += tl.dot(xe, tl.trans(glo.to(xe.dtype))) + tl.dot(xo, tl.trans(ghi.to(xe.dtype)))
            acc_u += tl.dot(xe, tl.trans(ulo.to(xe.dtype))) + tl.dot(xo, tl.trans(uhi.to(xe.dtype)))
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + toks[:, None] * I + rows[None, :], h, mask=tmask[:, None])

    @triton.jit
    def _down_kernel(h_ptr, blk_ptr, y_ptr, n, H, I, R, QB, SB, CHUNK, ASYM: tl.constexpr,
                     SCALE_BF16: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr):
        """Rows CHUNK * pid_s of I onwards (split over programs: a decode expert's H / g column tiles alone would
        leave most of the GPU idle), added into y."""
        pid_n, pid_h, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        toks = pid_n * BN + tl.arange(0, BN)
        tmask = toks < n
        k0 = pid_h * 2 * HALF
        acc_e = tl.zeros((BN, HALF), tl.float32)
        acc_o = tl.zeros((BN, HALF), tl.float32)
        for i0 in range(pid_s * CHUNK, tl.minimum(pid_s * CHUNK + CHUNK, I), BK):
            rows = i0 + tl.arange(0, BK)
            hv = tl.load(h_ptr + toks[:, None] * I + rows[None, :], mask=tmask[:, None], other=0.0)
            lo, hi = _tile(blk_ptr, rows + 2 * I, k0, R, QB, SB, ASYM, HALF, SCALE_BF16)
            acc_e += tl.dot(hv, lo.to(hv.dtype))
            acc_o += tl.dot(hv, hi.to(hv.dtype))
        j = tl.arange(0, HALF)
        tl.atomic_add(y_ptr + toks[:, None] * H + k0 + 2 * j[None, :], acc_e, mask=tmask[:, None])
        tl.atomic_add(y_ptr + toks[:, None] * H + k0 + 2 * j[None, :] + 1, acc_o, mask=tmask[:, None])


def int4_ffn(x: torch.Tensor, block: torch.Tensor, fmt) -> torch.Tensor:
    """One int4 expert on its tokens: x [n, H] bf16/fp16, block [block bytes] -> [n, H] fp32. The intermediate
    h [n, I] is kept in x's dtype, as the fallback keeps it."""
    n, H, I, spec = x.shape[0], fmt.hidden, fmt.inter, fmt.spec
    x = x.contiguous()
    half = spec.group_size // 2
    bk = 32 if I % 32 == 0 else 16
    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.zeros(n, H, dtype=torch.float32, device=x.device)
    q = (fmt.record, fmt.q_bytes, fmt.scale_bytes)
    flags = dict(ASYM=not spec.symmetric, SCALE_BF16=spec.scale_dtype == torch.bfloat16, HALF=half)
    bn = 16 if n <= 16 else 32
    _gate_up_kernel[(triton.cdiv(n, bn), I // 16)](x, block, h, n, H, I, *q, BN=bn, BI=16, **flags)
    split = max(1, min(I // (8 * bk), DOWN_PROGRAMS // max(H // (2 * half), 1)))  # >= 8 tiles of rows each
    chunk = triton.cdiv(I, split * bk) * bk
    grid = (triton.cdiv(n, bn), H // (2 * half), triton.cdiv(I, chunk))
    _down_kernel[grid](h, block, y, n, H, I, *q, chunk, BN=bn, BK=bk, **flags)
    return y


DOWN_PROGRAMS = 512  # the down GEMM's programs per token block, about: a few per SM
