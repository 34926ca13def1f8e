"""A layer's routed experts in two Triton launches, as SGLang's and vLLM's fused_moe do: the (token, expert)
pairs sorted by expert into blocks of BM rows, one grouped GEMM for gate and up with SiLU-and-multiply fused,
one for down with the routing weights applied; the top-k sum is one reduction after it.

The sort (align) stays on the device, so a call makes no host sync and a decode step can be one CUDA graph.
Each block of BM sorted pairs belongs to one expert (an expert's run is padded to a multiple of BM with an
invalid pair id, M); a program reads its block's expert from block_expert and gathers its tokens' rows of x.
Weights are read through strides: the GPU store's gate_up [E, 2I, H] and down_t [E, I, H] (a column-major view
of down as published), or a quantized store's blocks (quant/triton_moe.py). PyTorch's grouped GEMMs
(experts/ffn.py) remain the reference and the path where Triton is absent.

Legend: N = tokens, K = experts per token, M = N * K routing pairs, P = padded pairs (a multiple of BM),
E = experts, H = hidden, I = intermediate rows, BM/BN/BK = tile rows (pairs), columns, reduction step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch grouped GEMMs run
    triton = None


def available(x: torch.Tensor) -> bool:
    """Triton importable and x a CUDA tensor in bf16/fp16 (fp32 runs take the PyTorch path)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of both launches, by token count (decode: few pairs per expert, small BM)."""

    bm: int
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3


def tiles_for(pairs: int, experts: int) -> Tiles:
    """Tiles by the mean pairs per expert: decode (a handful) takes BM 16, prefill grows it."""
    per_expert = pairs / max(experts, 1)
    if per_expert <= 16:
        return Tiles(16, 32, 128, warps=4, stages=4)
    if per_expert <= 64:
        return Tiles(32, 64, 64, warps=4, stages=4)
    return Tiles(64, 128, 64, warps=8, stages=3)


def align(topk_ids: torch.Tensor, num_experts: int, bm: int):
    """Sort the routing pairs by expert into blocks of bm rows, on the device (no host sync).

    Returns (sorted_ids [P] pair ids, M where padding; block_expert [P / bm]; total [1] padded pairs in use).
    P bounds the padded total for any routing: M + min(E, M) * (bm - 1), rounded up to bm."""
    flat = topk_ids.flatten()                                                # [M]
    M, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))                       # [E] (bincount would sync)
    padded = (counts + bm - 1) // bm * bm
    pend = padded.cumsum(0)                                                   # [E] end of each padded run
    cstart = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)                                  # [M] pair ids by expert
    e_sorted = flat[order]
    pos = pend[e_sorted] - padded[e_sorted] + torch.arange(M, device=dev) - cstart[e_sorted]
    P = -(-(M + min(num_experts, M) * (bm - 1)) // bm) * bm
    sorted_ids = torch.full((P,), M, dtype=torch.int32, device=dev).scatter_(0, pos, order.to(torch.int32))
    starts = torch.arange(0, P, bm, device=dev)
    block_expert = torch.searchsorted(pend, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, pend[-1:].to(torch.int32)


def align_on_device(topk_ids: torch.Tensor, num_experts: int, bm: int):
    """align() in one Triton launch (a dozen PyTorch kernels otherwise, each a few microseconds of a decode
    step). An expert's pairs land in its blocks in the order atomics give them, which changes no result: the
    rows of a GEMM are independent."""
    flat = topk_ids.flatten()
    M, dev = flat.numel(), flat.device
    P = -(-(M + min(num_experts, M) * (bm - 1)) // bm) * bm
    block_e = triton.next_power_of_2(num_experts)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    block_expert = torch.empty(P // bm, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    scratch = torch.empty(2 * block_e + M, dtype=torch.int32, device=dev)  # counts, run starts, ranks
    _align_kernel[(1,)](flat, sorted_ids, block_expert, total, scratch, M, num_experts, P, BM=bm, BLOCK=256,
                        BLOCK_E=block_e, BLOCK_B=max(16, 4096 // block_e), num_warps=4)
    return sorted_ids, block_expert, total


if triton is not None:
    @triton.jit
    def _align_kernel(ids_ptr, sorted_ptr, bexp_ptr, total_ptr, scratch, M, E, P, BM: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
        """One program: counts (each pair's rank in its expert from an atomic), padded run starts by a cumsum,
        each pair scattered to its start + rank, each block's expert from the run ends."""
        offs, es = tl.arange(0, BLOCK), tl.arange(0, BLOCK_E)
        counts_ptr, start_ptr, rank_ptr = scratch, scratch + BLOCK_E, scratch + 2 * BLOCK_E
        tl.store(counts_ptr + es, tl.zeros((BLOCK_E,), tl.int32))
        for p0 in range(0, P, BLOCK):
            tl.store(sorted_ptr + p0 + offs, tl.zeros((BLOCK,), tl.int32) + M, mask=p0 + offs < P)
        tl.debug_barrier()
        for m0 in range(0, M, BLOCK):
            msk = m0 + offs < M
            e = tl.load(ids_ptr + m0 + offs, mask=msk, other=0)
            r = tl.atomic_add(counts_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=msk)
            tl.store(rank_ptr + m0 + offs, r, mask=msk)
        tl.debug_barrier()
        # .cg: past L1, to read what the other threads' atomics and stores left in L2 before the barrier
        c = tl.load(counts_ptr + es, mask=es < E, other=0, cache_modifier=".cg")
        padded = (c + BM - 1) // BM * BM
        pend = tl.cumsum(padded, 0)                                          # [BLOCK_E] run ends
        tl.store(start_ptr + es, pend - padded)
        tl.store(total_ptr, tl.sum(padded, 0))
        tl.debug_barrier()
        for m0 in range(0, M, BLOCK):
            msk = m0 + offs < M
            e = tl.load(ids_ptr + m0 + offs, mask=msk, other=0)
            pos = (tl.load(start_ptr + e, mask=msk, other=0, cache_modifier=".cg")
                   + tl.load(rank_ptr + m0 + offs, mask=msk, other=0, cache_modifier=".cg"))
            tl.store(sorted_ptr + pos, m0 + offs, mask=msk)
        for b0 in range(0, P // BM, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            ends = (pend[None, :] <= (bs * BM)[:, None]) & (es < E)[None, :]   # [BLOCK_B, BLOCK_E]
            be = tl.minimum(tl.sum(ends.to(tl.int32), 1), E - 1)
            tl.store(bexp_ptr + bs, be, mask=bs < P // BM)

    @triton.jit
    def _topk_sum_kernel(y_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
        """out[n] = sum over k of y[n * K + k] in fp32, rounded once to out's dtype (the sum and the cast in one)."""
        n, cols = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(K):
            acc += tl.load(y_ptr + (n * K + k).to(tl.int64) * H + cols, mask=cols < H, other=0.0)
        tl.store(out_ptr + n.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)

    @triton.jit
    def _silu_mul(g, u, dtype: tl.constexpr):
        """silu(g) * u rounded where PyTorch rounds it (gate and up, silu, the product in `dtype`): the same
        intermediate as the grouped GEMMs' path but for the accumulation order."""
        g = g.to(dtype).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        return (s * u.to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ptr, bexp_ptr, total_ptr, M, TOPK, H, I,
                        s_we, s_wn, s_wk, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """h[pair, n] = silu(x[tok] . gate[e, n]) * (x[tok] . up[e, n]) for a block of pairs and BN rows n."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(I, BN)
        pid_m, pid_n = pid // num_n, pid % num_n
        if pid_m * BM >= tl.load(total_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))            # [BM]
        valid = pair < M
        tok = (pair // TOPK).to(tl.int64)
        e = tl.load(bexp_ptr + pid_m).to(tl.int64)
        rows = pid_n * BN + tl.arange(0, BN)                                  # [BN]
        rmask = rows < I
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + tok[:, None] * H + ks[None, :]                       # [BM, BK]
        g_ptrs = w_ptr + e * s_we + rows[None, :] * s_wn + ks[:, None] * s_wk  # [BK, BN]
        u_ptrs = g_ptrs + I * s_wn
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, H, BK):
            kmask = ks < H - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=kmask[:, None] & rmask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=kmask[:, None] & rmask[None, :], other=0.0)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BK
            g_ptrs += BK * s_wk
            u_ptrs += BK * s_wk
        h = _silu_mul(acc_g, acc_u, h_ptr.dtype.element_ty)
        out = h_ptr + pair.to(tl.int64)[:, None] * I + rows[None, :]
        tl.store(out, h, mask=valid[:, None] & rmask[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, y_ptr, wts_ptr, sorted_ptr, bexp_ptr, total_ptr, M, H, I,
                     s_we, s_wk, s_wn, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """y[pair, c] = weight[pair] * (h[pair] . down_t[e, :, c]) for a block of pairs and BN columns c (fp32)."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(H, BN)
        pid_m, pid_n = pid // num_n, pid % num_n
        if pid_m * BM >= tl.load(total_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        valid = pair < M
        e = tl.load(bexp_ptr + pid_m).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        ks = tl.arange(0, BK)
        a_ptrs = h_ptr + pair[:, None] * I + ks[None, :]                      # [BM, BK]
        b_ptrs = w_ptr + e * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn  # [BK, BN]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, I, BK):
            kmask = ks < I - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * s_wk
        # rounded to the activations' dtype first, as the grouped GEMM's output is
        w = tl.load(wts_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * w[:, None]
        tl.store(y_ptr + pair[:, None] * H + cols[None, :], y, mask=valid[:, None] & cmask[None, :])


def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  gate_up: torch.Tensor, down_t: torch.Tensor, tiles: Tiles | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """All routed experts of a layer in two launches (CUDA, bf16/fp16, no host sync).

    x [N, H], topk_ids/topk_weights [N, K], gate_up [E, 2I, H], down_t [E, I, H] (any strides) -> [N, H] in
    out_dtype (default x's)."""
    N, K = topk_ids.shape
    E, two_i, H = gate_up.shape
    I, M = two_i // 2, N * K
    t = tiles or tiles_for(M, E)
    sorted_ids, block_expert, total = align_on_device(topk_ids, E, t.bm)
    x = x.contiguous()
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    y = torch.empty(M, H, dtype=torch.float32, device=x.device)
    blocks = sorted_ids.numel() // t.bm
    opts = dict(BM=t.bm, BN=t.bn, BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    _gate_up_kernel[(blocks * triton.cdiv(I, t.bn),)](
        x, gate_up, h, sorted_ids, block_expert, total, M, K, H, I, *gate_up.stride(), **opts)
    _down_kernel[(blocks * triton.cdiv(H, t.bn),)](
        h, down_t, y, topk_weights.contiguous(), sorted_ids, block_expert, total, M, H, I, *down_t.stride(), **opts)
    return topk_sum(y, N, K, out_dtype or x.dtype)


def topk_sum(y: torch.Tensor, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """y [N*K, H] fp32, the weighted expert outputs of each token's K pairs -> [N, H] in dtype, one launch."""
    H = y.shape[1]
    out = torch.empty(N, H, dtype=dtype, device=y.device)
    _topk_sum_kernel[(N, triton.cdiv(H, 1024))](y, out, H, K=K, BLOCK=1024, num_warps=4)
    return out
