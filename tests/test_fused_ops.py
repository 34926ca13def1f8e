"""The decoder's fused ops (models/fused_ops.py) against the PyTorch ops they replace: q/k norm with RoPE within
bf16/fp16 rounding (relative 1e-2: the norm rounds once where PyTorch may round twice); the router's top-k ids
exactly and its weights to fp32 noise."""

from __future__ import annotations


import pytest
import torch
from conftest import run_interpreted

from moeflow.models import fused_ops
from moeflow.models.layers import RMSNorm, Rotary, rotate
from moeflow.models.routers import route


def check_norm_rope(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for n, heads, D in ((1, 4, 32), (5, 2, 128)):
        x = torch.randn(n, heads, D, generator=g).to(device, dtype)
        norm = RMSNorm(D, 1e-6).to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        cos, sin = Rotary(D, 10000.0).to(device)(torch.arange(7, 7 + n, device=device), dtype)
        for nm in (norm, None):
            want = rotate(nm(x) if nm is not None else x, cos, sin).float()
            got = fused_ops.norm_rope(x, nm, cos, sin).float()
            assert float((got - want).norm() / want.norm()) < 1e-2, (n, heads, D, nm is None)


def check_softmax_topk(device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    for n, e, k, renorm in ((1, 128, 8, True), (9, 6, 2, False), (4, 60, 6, True)):
        logits = torch.randn(n, e, generator=g).to(device, dtype)
        was, fused_ops.ENABLED = fused_ops.ENABLED, False
        try:
            want_ids, want_w = route(logits, k, renorm)
        finally:
            fused_ops.ENABLED = was
        ids, w = fused_ops.softmax_topk(logits, k, renorm)
        assert ids.dtype == want_ids.dtype and torch.equal(ids, want_ids), (n, e, k)
        assert w.dtype == torch.float32 and torch.allclose(w, want_w, rtol=1e-5, atol=1e-7), (n, e, k)


def check_decode_attention(device: str, dtype: torch.dtype) -> None:
    """decode_attention against SDPA over positions 0..pos (the last `window`), the new K/V written at pos."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    Hq, Hkv, D = 8, 2, 32
    for T, pos, window in ((40, 0, None), (40, 17, None), (700, 650, None), (700, 600, 100)):
        kc, vc = (torch.randn(T, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
        q = torch.randn(Hq, D, generator=g).to(device, dtype)
        k, v = (torch.randn(Hkv, D, generator=g).to(device, dtype) for _ in range(2))
        lo = 0 if window is None else max(0, pos - window + 1)
        K = torch.cat([kc[lo:pos], k[None]]).transpose(0, 1)[None]  # [1, Hkv, n, D]
        V = torch.cat([vc[lo:pos], v[None]]).transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[None, :, None].float(), K.float(), V.float(), enable_gqa=True)
        got = fused_ops.decode_attention(q, k, v, kc, vc, torch.tensor([pos], device=device), window)
        assert float((got.float() - want[0, :, 0]).norm() / want.norm()) < 1e-2, (T, pos, window)
        assert torch.equal(kc[pos], k) and torch.equal(vc[pos], v)


def test_fused_ops_off_the_gpu_are_pytorch_ops():
    """On the CPU the layers never take the fused ops (their PyTorch maths stay the reference)."""
    x = torch.randn(2, 4, 32, dtype=torch.bfloat16)
    assert not fused_ops.norm_rope_runs(x, torch.ones(2, 32)) and not fused_ops.topk_runs(x[:, 0], 2)


def test_fused_ops_in_the_interpreter():
    code = ("import torch, test_fused_ops as t; t.check_norm_rope('cpu', torch.float16);"
            "t.check_softmax_topk('cpu', torch.float16); t.check_decode_attention('cpu', torch.float16)")
    run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_match_pytorch_on_cuda(dtype):
    check_norm_rope("cuda", dtype)
    check_softmax_topk("cuda", dtype)
    check_decode_attention("cuda", dtype)


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-mixtral"])
def test_fused_ops_keep_the_greedy_tokens_on_cuda(name):
    """A tiny model's greedy tokens (decode under the CUDA graph) with the fused ops on are the PyTorch ops'."""
    from moeflow.checkpoint import load
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams

    ck = load(f"synthetic:{name}", device="cuda", dtype="bf16")
    outs, was = [], (fused_ops.ENABLED, fused_ops.DECODE_ATTENTION)
    try:
        for on in (False, True):
            fused_ops.ENABLED = fused_ops.DECODE_ATTENTION = on
            engine = LLMEngine(ck, max_seqs=1, max_len=64)
            outs.append(engine.generate(["Fused ops replay the same tokens"],
                                        SamplingParams(max_new_tokens=24, ignore_eos=True))[0].output_ids)
    finally:
        fused_ops.ENABLED, fused_ops.DECODE_ATTENTION = was
    assert outs[0] == outs[1]
