"""Triton fusions of the decoder's small ops, on CUDA where Triton imports (PyTorch's ops elsewhere, exactly):
the per-head q/k RMSNorm with RoPE (Qwen3: a dozen kernels a layer become one) and the router's softmax, top-k
and renormalization (five become one). In a graphed decode step every kernel costs a few microseconds whatever
its size, so the count is what matters. Each rounds where the PyTorch ops round, in the activations' dtype.

Legend: N = tokens, Hh = heads (query and key heads together), D = head dim, E = experts, K = experts per token.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = False  # the fused ops where they run (False: PyTorch's ops everywhere, for comparisons)


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
