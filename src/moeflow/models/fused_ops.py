"""Triton fusions of the decoder's small ops, on CUDA where Triton imports (PyTorch's ops elsewhere, exactly):
the per-head q/k RMSNorm with RoPE (Qwen3: a dozen kernels a layer become one), the router's softmax, top-k
and renormalization (five become one), and a graphed decode step's attention with its KV-cache write (about
eight become two). In a graphed decode step every kernel costs a few microseconds whatever
its size, so the count is what matters. Each rounds where the PyTorch ops round, in the activations' dtype.

Legend: N = tokens, Hh = heads (query and key heads together), D = head dim, E = experts, K = experts per token,
Hq/Hkv = query/key-value heads, G = Hq / Hkv, T = the slot's positions, S = splits of T.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = True  # the fused ops where they run (False: PyTorch's ops everywhere, for comparisons)
DECODE_ATTENTION = True  # a graphed decode step's attention by decode_attention (False: SDPA over the slot)


def runs(x: torch.Tensor) -> bool:
    return ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:
    @triton.jit
    def _norm_rope_kernel(x_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, heads, eps, D2: tl.constexpr,
                          NORM: tl.constexpr):
        """One (token, head) row of D = 2 D2 values: RMSNorm by w (NORM), rounded, then rotated by the token's
        cos/sin."""
        row = tl.program_id(0)
        tok = row // heads
        j = tl.arange(0, D2)
        dt = out_ptr.dtype.element_ty
        x1 = tl.load(x_ptr + row * 2 * D2 + j).to(tl.float32)
        x2 = tl.load(x_ptr + row * 2 * D2 + D2 + j).to(tl.float32)
        if NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * D2) + eps)
            n1 = (x1 * rstd * tl.load(w_ptr + j).to(tl.float32)).to(dt).to(tl.float32)
            n2 = (x2 * rstd * tl.load(w_ptr + D2 + j).to(tl.float32)).to(dt).to(tl.float32)
        else:
            n1, n2 = x1, x2
        cp, sp = cos_ptr + tok * 2 * D2 + j, sin_ptr + tok * 2 * D2 + j
        c1, c2 = tl.load(cp).to(tl.float32), tl.load(cp + D2).to(tl.float32)
        s1, s2 = tl.load(sp).to(tl.float32), tl.load(sp + D2).to(tl.float32)
        o1 = (n1 * c1).to(dt).to(tl.float32) - (n2 * s1).to(dt).to(tl.float32)
        o2 = (n2 * c2).to(dt).to(tl.float32) + (n1 * s2).to(dt).to(tl.float32)
        tl.store(out_ptr + row * 2 * D2 + j, o1.to(dt))
        tl.store(out_ptr + row * 2 * D2 + D2 + j, o2.to(dt))

    @triton.jit
    def _softmax_topk_kernel(logits_ptr, ids_ptr, w_ptr, E, K: tl.constexpr, KP: tl.constexpr,
                             BLOCK_E: tl.constexpr, RENORM: tl.constexpr):
        """One token: softmax over E in fp32, the K largest in descending order, renormalized to sum 1."""
        tok = tl.program_id(0)
        es = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + tok * E + es, mask=es < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, 0))
        p = p / tl.sum(p, 0)
        ks = tl.arange(0, KP)  # K padded to a power of two
        top_w = tl.zeros((KP,), tl.float32)
        top_i = tl.zeros((KP,), tl.int64)
        q = tl.where(es < E, p, -1.0)
        for k in tl.static_range(K):
            best = tl.max(q, 0)
            i = tl.min(tl.where(q == best, es, BLOCK_E), 0)  # the lowest index among equals
            top_w = tl.where(ks == k, best, top_w)
            top_i = tl.where(ks == k, i.to(tl.int64), top_i)
            q = tl.where(es == i, -1.0, q)
        if RENORM:
            top_w = top_w / tl.sum(top_w, 0)
        tl.store(ids_ptr + tok * K + ks, top_i, mask=ks < K)
        tl.store(w_ptr + tok * K + ks, top_w, mask=ks < K)


def norm_rope(x: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, Hh, D] -> rotate(norm(x), cos, sin) [N, Hh, D]; norm an RMSNorm (weight [D], eps) or None;
    cos, sin [N, D] in x's dtype."""
    N, heads, D = x.shape
    x, out = x.contiguous(), torch.empty_like(x)
    weight, eps = (x, 0.0) if norm is None else (norm.weight, norm.eps)
    _norm_rope_kernel[(N * heads,)](x, out, weight, cos.contiguous(), sin.contiguous(), heads, eps, D2=D // 2,
                                    NORM=norm is not None, num_warps=1)
    return out


def norm_rope_runs(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x [N, Hh, D] rotated whole by cos [N, D] (not a part of each head, as MLA's), D / 2 a power of two."""
    D = x.shape[-1]
    return runs(x) and cos.shape[-1] == D and D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (ids [N, K] int64, weights [N, K] fp32): routers.route's maths in one launch."""
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    w = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    _softmax_topk_kernel[(N,)](logits.contiguous(), ids, w, E, K=k, KP=triton.next_power_of_2(k),
                               BLOCK_E=triton.next_power_of_2(E), RENORM=renormalize, num_warps=1 if E <= 256 else 4)
    return ids, w


def topk_runs(logits: torch.Tensor, k: int) -> bool:
    return runs(logits) and logits.dim() == 2 and k <= logits.shape[-1] <= 4096


if triton is not None:
    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, part_ptr, ml_ptr, scale, window, CHUNK,
                            SPLITS, HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                            BN: tl.constexpr):
        """kv head h's G query heads over the cached keys of split sp (positions below pos; with the new token's
        own key and value in the split that holds pos): partial softmax sums (m, l) and output; split 0 writes
        the new key and value into the cache (no program reads that position from the cache)."""
        h, sp = tl.program_id(0), tl.program_id(1)
        pos = tl.load(pos_ptr).to(tl.int32)
        lo = sp * CHUNK
        if window > 0:
            lo = tl.maximum(lo, pos - window + 1)
        hi = tl.minimum(sp * CHUNK + CHUNK, pos)
        gs, ds = tl.arange(0, BG), tl.arange(0, D)
        q = tl.load(q_ptr + (h * G + gs)[:, None] * D + ds[None, :], mask=(gs < G)[:, None], other=0.0)
        m = tl.zeros((BG,), tl.float32) - 1e30
        lsum = tl.zeros((BG,), tl.float32)
        acc = tl.zeros((BG, D), tl.float32)
        for n0 in range(lo, hi, BN):
            ns = n0 + tl.arange(0, BN)
            nm = ns < hi
            off = (ns[:, None] * HKV + h) * D + ds[None, :]
            kt = tl.load(kc_ptr + off, mask=nm[:, None], other=0.0)                 # [BN, D]
            sc = tl.where(nm[None, :], tl.dot(q, tl.trans(kt)) * scale, float("-inf"))  # [BG, BN]
            m_new = tl.maximum(m, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m - m_new)
            vt = tl.load(vc_ptr + off, mask=nm[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            lsum = lsum * alpha + tl.sum(p, 1)
            m = m_new
        kn = tl.load(k_ptr + h * D + ds)
        vn = tl.load(v_ptr + h * D + ds)
        if (pos >= sp * CHUNK) & (pos < sp * CHUNK + CHUNK):
            sc = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale  # [BG]
            m_new = tl.maximum(m, sc)
            alpha, p = tl.exp(m - m_new), tl.exp(sc - m_new)
            acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
            lsum = lsum * alpha + p
            m = m_new
        if sp == 0:
            tl.store(kc_ptr + (pos * HKV + h) * D + ds, kn)
            tl.store(vc_ptr + (pos * HKV + h) * D + ds, vn)
        row = (h * SPLITS + sp) * BG + gs
        tl.store(part_ptr + row[:, None] * D + ds[None, :], acc)
        tl.store(ml_ptr + row * 2, m)
        tl.store(ml_ptr + row * 2 + 1, lsum)

    @triton.jit
    def _decode_combine_kernel(part_ptr, ml_ptr, out_ptr, SPLITS, G: tl.constexpr, BG: tl.constexpr,
                               D: tl.constexpr, BS: tl.constexpr):
        """Query head qh: the splits' partial outputs rescaled to their common maximum and normalized."""
        qh = tl.program_id(0)
        h, g = qh // G, qh % G
        ss, ds = tl.arange(0, BS), tl.arange(0, D)
        row = (h * SPLITS + ss) * BG + g                                          # [BS]
        sm = ss < SPLITS
        m = tl.load(ml_ptr + row * 2, mask=sm, other=-1e30)
        lsum = tl.load(ml_ptr + row * 2 + 1, mask=sm, other=0.0)
        w = tl.exp(m - tl.max(m, 0))
        acc = tl.load(part_ptr + row[:, None] * D + ds[None, :], mask=sm[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
        tl.store(out_ptr + qh * D + ds, o.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, position: torch.Tensor, window: int | None) -> torch.Tensor:
    """One sequence's decode token at the device-side `position` [1]: k, v [Hkv, D] written into the slot's
    caches [T, Hkv, D], q [Hq, D] attending to positions 0..position (the last `window` of them) -> [Hq, D].
    The splits of T are fixed by T, so one CUDA graph serves every position; the loops stop at position."""
    Hq, D = q.shape
    T, Hkv = k_cache.shape[0], k_cache.shape[1]
    G = Hq // Hkv
    chunk = max(256, triton.next_power_of_2(triton.cdiv(T, 64)))
    splits = triton.cdiv(T, chunk)
    bg = max(16, triton.next_power_of_2(G))
    part = torch.empty(Hkv * splits * bg, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(Hkv * splits * bg, 2, dtype=torch.float32, device=q.device)
    _decode_attn_kernel[(Hkv, splits)](q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache, position,
                                       part, ml, D ** -0.5, window or 0, chunk, splits, HKV=Hkv, G=G, BG=bg, D=D,
                                       BN=64, num_warps=4)
    out = torch.empty_like(q)
    _decode_combine_kernel[(Hq,)](part, ml, out, splits, G=G, BG=bg, D=D, BS=triton.next_power_of_2(splits),
                                  num_warps=4)
    return out


def decode_attention_runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """q [1, Hq, D] against a contiguous slot cache [S, T, Hkv, D], D a power of two of at least 16."""
    D = q.shape[-1]
    return (DECODE_ATTENTION and runs(q) and q.shape[0] == 1 and k_cache.is_contiguous() and k_cache.dim() == 4
            and D >= 16 and D & (D - 1) == 0 and q.shape[1] % k_cache.shape[2] == 0)
