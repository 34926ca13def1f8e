"""Triton kernels for int4 experts (quant/format.py blocks) on their tokens, dequantizing inside the GEMMs: one
expert, or (the decode GEMVs) a wave's slots, each on its own entries.

The FFN's two GEMMs: gate_up computes h = silu(x gate^T) * (x up^T) [n, I]; down computes y = h down_t [n, H],
split over I and added into y. The packed bytes hold the even columns in their low nibbles and the odd ones in
their high: the kernels never interleave, they take the even and odd columns of x (gate_up) or of y (down)
apart. Each GEMM has two kernels, by token count:

- decode (n <= GEMV_MAX_TOKENS): GEMVs. A step reads GEMV_STEP_BYTES contiguous bytes of each of a few rows
  (several groups, [rows, groups, g/2 bytes], each group's scale broadcast), dequantizes them once and multiplies
  them by every token's x (or h) elementwise in fp32; x is read as 32-bit words, one (even, odd) pair a word.
- prefill: tl.dot tiles spanning one group along H (BK = g), the tokens padded to 16 rows at least.

Used where Triton is importable on a CUDA device; the PyTorch dequantize-then-matmul fallback (quant/format.py
rows) elsewhere.

Legend: n = tokens, H = hidden, I = intermediate rows, g = group size, G = H / g, R = record bytes of a row,
BR = rows a tile, NG = groups a step, HALF = g / 2 bytes of codes a group, BT = tokens rounded up to a power of 2.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs): the fallback runs
    triton = None


# The decode GEMVs by default (one expert's and the offloaded waves', experts/waves.py); off: the tiled kernels slot
# by slot and the batched dequantization, for comparisons (docs/quantization.md has the measured difference).
GEMV = True
GEMV_MAX_TOKENS = 4  # decode kernels up to here: their work grows with n (the tiled ones' is flat to 16 tokens)
GEMV_STEP_BYTES = 256  # bytes of each row a GEMV step reads: 2 full 128-byte lines, 16 bytes a thread
GEMV_PROGRAMS = 512  # programs a GEMV launch aims for: about 4 per SM of an H100 (132 SMs)
DOWN_ROWS, DOWN_UNROLL = 4, 4  # the down GEMV's tile rows, and tiles loaded together in a step (I % 16 == 0)


def available(x: torch.Tensor, fmt) -> bool:
    """An int4 block on a CUDA device with bf16/fp16 activations (fp32 runs take the fallback, exactly), of
    shapes the tiles divide."""
    return x.is_cuda and supports(fmt, x.dtype)


def supports(fmt, dtype: torch.dtype) -> bool:
    """Triton importable, activations in bf16/fp16, int4 blocks of shapes the tiles divide: I a multiple of 16,
    groups a power of two (g / 2 bytes is a tile's last dim)."""
    return (triton is not None and dtype in (torch.bfloat16, torch.float16) and fmt.spec is not None and
            fmt.spec.bits == 4 and fmt.inter % 16 == 0 and fmt.spec.group_size & (fmt.spec.group_size - 1) == 0)


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


if triton is not None:
    @triton.jit
    def _f32(bits, BF16: tl.constexpr):
        """The 16-bit float in the low half of int32 `bits` as fp32 (bf16: a shift)."""
        if BF16:
            return (bits << 16).to(tl.float32, bitcast=True)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _pair(words, BF16: tl.constexpr):
        """int32 words of a 16-bit float row -> (even, odd) columns as fp32."""
        if BF16:
            return _f32(words, True), (words & -65536).to(tl.float32, bitcast=True)
        return _f32(words, False), _f32(words >> 16, False)

    @triton.jit
    def _weights(codes, zz, s, X_BF16: tl.constexpr):
        """Codes 0..15 (int32) -> (code - z) * s rounded to the activations' dtype, as fp32. zz = 2^23 + z: the
        bits 2^23 | code read as fp32 are 2^23 + code, so no int-to-float conversion runs and the difference is
        exact (z an integer, as quantize writes)."""
        w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zz) * s
        return w.to(tl.bfloat16 if X_BF16 else tl.float16).to(tl.float32)

    @triton.jit
    def _gemv_tile(blk_ptr, rows, cols, grp, gmask, R, QB, SB, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr,
                   X_BF16: tl.constexpr):
        """Code bytes `cols` of rows `rows` (group `grp` each; groups past the row masked by gmask), index tensors
        broadcasting to the tile -> (even, odd) weights of the tile, fp32."""
        row = blk_ptr + rows * R
        q = tl.load(row + cols, mask=gmask, other=0).to(tl.int32)
        sp = (row + QB + 2 * grp).to(tl.pointer_type(tl.int16))  # scales read as bits: see _f32
        s = _f32(tl.load(sp, mask=gmask, other=0).to(tl.int32), SCALE_BF16)
        if ASYM:
            zz = 8388608.0 + _f32(tl.load(sp + SB // 2, mask=gmask, other=0).to(tl.int32), SCALE_BF16)
        else:
            zz = 8388616.0  # 2^23 + 8
        return _weights(q & 15, zz, s, X_BF16), _weights(q >> 4, zz, s, X_BF16)

    @triton.jit
    def _expert(blk_ptr, offs_ptr, ids_ptr, w, BLOCK, NT: tl.constexpr, WAVE: tl.constexpr):
        """A program's expert and entries: (its block, its entries' range start : end). One expert (WAVE off): the
        block itself, entries 0 : NT. A wave: slot w of the wave's slots, its entries offs[w - 1] : offs[w] of
        the entries sorted by slot, the first NT of them (the real ones: a static wave's pads, weight 0, come
        after them in its last slot)."""
        base, start, end = blk_ptr, 0, NT
        if WAVE:
            start = tl.where(w > 0, tl.load(offs_ptr + tl.maximum(w - 1, 0)), 0)
            end = tl.minimum(tl.load(offs_ptr + w), start + NT)
            base = blk_ptr + tl.load(ids_ptr + w).to(tl.int64) * BLOCK
        return base, start, end

    @triton.jit
    def _gate_up_gemv(x_ptr, blk_ptr, h_ptr, ent_ptr, offs_ptr, ids_ptr, K, BLOCK, H, I, R, QB, SB,
                      NT: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, NG: tl.constexpr, HALF: tl.constexpr,
                      ASYM: tl.constexpr, SCALE_BF16: tl.constexpr, X_BF16: tl.constexpr, WAVE: tl.constexpr):
        """h [entries, I] at rows BR * pid 0 onwards (of the wave's slot pid 1). A step dequantizes NG groups of
        BR gate and BR up rows once, then sums each entry's products (its token's x) to [BR]."""
        base, start, end = _expert(blk_ptr, offs_ptr, ids_ptr, tl.program_id(1), BLOCK, NT, WAVE)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)                # [BR]
        j = tl.arange(0, BT)
        e = start + j                                                   # [BT] entry positions: rows of h
        G = H // (2 * HALF)
        x32 = x_ptr.to(tl.pointer_type(tl.int32))                       # word k: x's columns 2k, 2k + 1
        acc_g = tl.zeros((BR, BT), tl.float32)
        acc_u = tl.zeros((BR, BT), tl.float32)
        for g0 in range(0, G, NG):
            grp = g0 + tl.arange(0, NG)                                   # [NG]
            gm = grp < G
            cols = grp[:, None] * HALF + tl.arange(0, HALF)[None, :]     # [NG, HALF] code bytes = x's words
            cols3, grp3, gm3 = cols[None], grp[None, :, None], gm[None, :, None]
            glo, ghi = _gemv_tile(base, rows[:, None, None], cols3, grp3, gm3, R, QB, SB, ASYM, SCALE_BF16,
                                  X_BF16)                                  # [BR, NG, HALF]
            ulo, uhi = _gemv_tile(base, rows[:, None, None] + I, cols3, grp3, gm3, R, QB, SB, ASYM, SCALE_BF16,
                                  X_BF16)
            for t in tl.static_range(NT):
                tok = t
                if WAVE:  # entry t's token (past the slot's last entry, that one's: its h row is not stored)
                    tok = tl.load(ent_ptr + tl.minimum(start + t, end - 1)) // K
                xw = tl.load(x32 + tok * (H // 2) + cols, mask=gm[:, None], other=0)
                xe, xo = _pair(xw, X_BF16)
                xe, xo = xe[None], xo[None]                               # [1, NG, HALF]
                pg = tl.sum(tl.sum(glo * xe + ghi * xo, axis=2), axis=1)  # [BR]
                pu = tl.sum(tl.sum(ulo * xe + uhi * xo, axis=2), axis=1)
                acc_g += tl.where(j[None, :] == t, pg[:, None], 0.0)
                acc_u += tl.where(j[None, :] == t, pu[:, None], 0.0)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u                         # [BR, BT]
        tl.store(h_ptr + e[None, :] * I + rows[:, None], h, mask=e[None, :] < end)

    @triton.jit
    def _down_gemv(h_ptr, blk_ptr, y_ptr, ent_ptr, offs_ptr, ids_ptr, wts_ptr, K, BLOCK, H, I, R, QB, SB, CHUNK,
                   NT: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, U: tl.constexpr, NG: tl.constexpr,
                   HALF: tl.constexpr, ASYM: tl.constexpr, SCALE_BF16: tl.constexpr, X_BF16: tl.constexpr,
                   WAVE: tl.constexpr):
        """y[tokens, columns of NG groups at pid 0] += h @ down_t over rows CHUNK * pid 1 onwards (of the wave's
        slot pid 2; a wave's entries weighted). Tiles are [BT, BR, NG, HALF], the entries leading so each weight
        dequantizes once; products add up elementwise and the rows are summed once at the end (no reduction in
        the loop). U tiles a step, loaded together."""
        pid_c, pid_s = tl.program_id(0), tl.program_id(1)
        base, start, end = _expert(blk_ptr, offs_ptr, ids_ptr, tl.program_id(2), BLOCK, NT, WAVE)
        e = start + tl.arange(0, BT)                                    # [BT] entry positions: rows of h
        valid = e < end
        G = H // (2 * HALF)
        grp = pid_c * NG + tl.arange(0, NG)                              # [NG]
        gm = grp < G
        cols = grp[:, None] * HALF + tl.arange(0, HALF)[None, :]        # [NG, HALF] code bytes: y's column pairs
        e4, v4 = e[:, None, None, None], valid[:, None, None, None]      # [BT, 1, 1, 1]
        cols4, grp4, gm4 = cols[None, None], grp[None, None, :, None], gm[None, None, :, None]
        acc_e = tl.zeros((BT, BR, NG, HALF), tl.float32)
        acc_o = tl.zeros((BT, BR, NG, HALF), tl.float32)
        for i0 in range(pid_s * CHUNK, tl.minimum(pid_s * CHUNK + CHUNK, I), BR * U):
            for u in tl.static_range(U):
                rows = i0 + u * BR + tl.arange(0, BR)[None, :, None, None]  # [1, BR, 1, 1]
                lo, hi = _gemv_tile(base, rows + 2 * I, cols4, grp4, gm4, R, QB, SB, ASYM, SCALE_BF16,
                                    X_BF16)                                 # [1, BR, NG, HALF]
                hv = tl.load(h_ptr + e4 * I + rows, mask=v4, other=0.0).to(tl.float32)  # [BT, BR, 1, 1]
                acc_e += lo * hv
                acc_o += hi * hv
        ye, yo = tl.sum(acc_e, axis=1), tl.sum(acc_o, axis=1)           # [BT, NG, HALF]
        tok = e
        if WAVE:
            tok = tl.load(ent_ptr + e, mask=valid, other=0) // K
            wt = tl.load(wts_ptr + e, mask=valid, other=0.0)[:, None, None]
            ye, yo = ye * wt, yo * wt
        yp = y_ptr + tok[:, None, None] * H + 2 * cols[None]             # [BT, NG, HALF]
        m = valid[:, None, None] & gm[None, :, None]
        tl.atomic_add(yp, ye, mask=m)
        tl.atomic_add(yp + 1, yo, mask=m)


def int4_ffn(x: torch.Tensor, block: torch.Tensor, fmt, gemv: bool | None = None) -> torch.Tensor:
    """One int4 expert on its tokens: x [n, H] bf16/fp16, block [block bytes] -> [n, H] fp32. The intermediate
    h [n, I] is kept in x's dtype, as the fallback keeps it. gemv: the decode kernels or the tiled ones (default:
    the decode ones up to GEMV_MAX_TOKENS tokens while GEMV is on); probes force one to compare them."""
    n, H, I = x.shape[0], fmt.hidden, fmt.inter
    x = x.contiguous()
    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.zeros(n, H, dtype=torch.float32, device=x.device)
    args, flags = _format_args(fmt)
    if gemv is None:
        gemv = GEMV and n <= GEMV_MAX_TOKENS
    if gemv:
        _gemv(x, block, h, y, fmt, args, flags)
    else:
        _tiled(x, block, h, y, fmt, args, flags)
    return y


def gemv_blocks(H: int, I: int, g: int) -> tuple[int, int, int]:
    """(NG groups a step, gate_up rows a program, down rows a program) for an expert's shape."""
    ng = max(1, min(GEMV_STEP_BYTES, triton.next_power_of_2(H // 2)) // (g // 2))
    br = 8  # 8 rows x 256 bytes: a 16-byte load a thread of 4 warps; fewer where I is small, for more programs
    while br > 2 and I // br < GEMV_PROGRAMS:
        br //= 2
    col_blocks = triton.cdiv(H // g, ng)
    step = DOWN_ROWS * DOWN_UNROLL
    split = max(1, min(I // step, triton.cdiv(GEMV_PROGRAMS, col_blocks)))
    return ng, br, triton.cdiv(I, split * step) * step


def _gemv(x, block, h, y, fmt, args, flags) -> None:
    n = x.shape[0]
    none = (block,) * 3  # no wave: entries, offsets and slot ids unused
    _launch_gemv(x, block, h, y, none, block, 1, 0, fmt, args, dict(flags, NT=n, WAVE=False), 1)


def _launch_gemv(x, blocks, h, y, wave, wts, K, block_bytes, fmt, args, flags, W) -> None:
    """Both GEMVs over W experts (a grid axis): wave = (entries, offsets, slot ids) of a wave, wts its weights."""
    H, I, nt = fmt.hidden, fmt.inter, flags["NT"]
    ng, br, chunk = gemv_blocks(H, I, fmt.spec.group_size)
    flags = dict(flags, BT=triton.next_power_of_2(nt), NG=ng, X_BF16=x.dtype == torch.bfloat16)
    _gate_up_gemv[(I // br, W)](x, blocks, h, *wave, K, block_bytes, H, I, *args, BR=br, **flags)
    grid = (triton.cdiv(H // fmt.spec.group_size, ng), triton.cdiv(I, chunk), W)
    _down_gemv[grid](h, blocks, y, *wave, wts, K, block_bytes, H, I, *args, chunk, BR=DOWN_ROWS, U=DOWN_UNROLL,
                     **flags)


def wave_gemv(out: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, M: int, W: int, K: int, slots: torch.Tensor,
              fmt, most: int) -> None:
    """out [N, H] fp32 += a wave's entries through the GEMVs, the int4 slots [S, block bytes] read in place; no
    host sync (CUDA-graph safe). meta [M + W + M + W] int32: the entries (flat (token, k)) sorted by slot, the
    cumulative entries per slot, their weights (fp32 bits), the slots' ids; `most` bounds the real entries of
    a slot (those past it in a slot's run are a static wave's pads, weight 0: skipped)."""
    h = torch.empty(M, fmt.inter, dtype=x.dtype, device=x.device)  # a row per entry
    wave = (meta[:M], meta[M:M + W], meta[2 * M + W:2 * M + 2 * W])
    args, flags = _format_args(fmt)
    _launch_gemv(x.contiguous(), slots, h, out, wave, meta[M + W:2 * M + W].view(torch.float32), K,
                 slots.stride(0), fmt, args, dict(flags, NT=most, WAVE=True), W)


def _format_args(fmt) -> tuple[tuple[int, int, int], dict]:
    """Every kernel's record layout (bytes of a row, of its codes, of its scales) and the format's constexprs."""
    spec = fmt.spec
    return ((fmt.record, fmt.q_bytes, fmt.scale_bytes),
            dict(ASYM=not spec.symmetric, SCALE_BF16=spec.scale_dtype == torch.bfloat16, HALF=spec.group_size // 2))


def _tiled(x, block, h, y, fmt, args, flags) -> None:
    n, H, I, half = x.shape[0], fmt.hidden, fmt.inter, flags["HALF"]
    bk = 32 if I % 32 == 0 else 16
    bn = 16 if n <= 16 else 32
    _gate_up_kernel[(triton.cdiv(n, bn), I // 16)](x, block, h, n, H, I, *args, BN=bn, BI=16, **flags)
    split = max(1, min(I // (8 * bk), DOWN_PROGRAMS // max(H // (2 * half), 1)))  # >= 8 tiles of rows each
    chunk = triton.cdiv(I, split * bk) * bk
    grid = (triton.cdiv(n, bn), H // (2 * half), triton.cdiv(I, chunk))
    _down_kernel[grid](h, block, y, n, H, I, *args, chunk, BN=bn, BK=bk, **flags)


DOWN_PROGRAMS = 512  # the down GEMM's programs per token block, about: a few per SM
