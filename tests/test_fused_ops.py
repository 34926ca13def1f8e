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


def forced_logits(engines, prompt: str, steps: int, before) -> list[torch.Tensor]:
    """Teacher-forced decode: every engine gets the prompt, then at each step the first engine's greedy token;
    before(i) runs before each step of engine i (it sets what that engine runs with). -> logits [steps + 1, V]
    of each engine (the prompt's last position, then each decode step, under the CUDA graph on CUDA)."""
    from moeflow.engine.sequence import SamplingParams

    seqs = [e.add_request(prompt, SamplingParams(max_new_tokens=steps + 1)) for e in engines]
    for e in engines:
        e._admit()

    def step(i: int) -> torch.Tensor:
        before(i)
        return engines[i]._forward([seqs[i]])[0].float().clone()  # a graph's logits are its static output

    out = [[step(i)] for i in range(len(engines))]
    for _ in range(steps):
        token = int(out[0][-1].argmax())
        for i, s in enumerate(seqs):
            s.output_ids.append(token)
            out[i].append(step(i))
    return [torch.stack(o) for o in out]


def assert_logits_close(want: torch.Tensor, got: torch.Tensor, typical: float = 1e-2, spikes: int = 3,
                        worst: float = 0.25) -> None:
    """Per step relative error of the logits [steps, V] within fp16 rounding (about 1e-3; a wrong norm, RoPE
    position, routing weight or mask moves tiny-qwen3's by 1e-2 to 2e-1 at most steps), but for a few steps whose
    router had two experts within rounding of each other at the k-th place and broke the tie the other way (up to
    3e-2 on the CPU); none beyond `worst` (NaN fails too)."""
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)  # [steps]
    ok = int((rel < typical).sum()) >= rel.numel() - spikes and bool((rel < worst).all())
    assert ok, [round(float(r), 4) for r in rel]


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-mixtral"])
def test_fused_ops_keep_the_logits_on_cuda(name, monkeypatch):
    """A tiny model's teacher-forced logits (decode under the CUDA graph) with the fused ops on are the PyTorch
    ops'. In fp16, not bf16: random tiny models' top logits tie to the last bf16 bit, so any rounding difference
    picks another token (greedy tokens cannot be compared), and bf16 rounding noise alone moves the logits by as
    much as a real bug does."""
    from collections import Counter

    from moeflow.checkpoint import load
    from moeflow.engine.llm_engine import LLMEngine

    calls = Counter()
    for f in ("norm_rope", "softmax_topk", "decode_attention"):  # counted: the fused ops did run
        monkeypatch.setattr(fused_ops, f, lambda *a, _f=getattr(fused_ops, f), _n=f: calls.update([_n]) or _f(*a))
    ck = load(f"synthetic:{name}", device="cuda", dtype="fp16")
    engines = [LLMEngine(ck, max_seqs=1, max_len=64) for _ in range(2)]

    def before(i: int) -> None:
        fused_ops.ENABLED = fused_ops.DECODE_ATTENTION = bool(i)

    was = (fused_ops.ENABLED, fused_ops.DECODE_ATTENTION)
    try:
        want, got = forced_logits(engines, "Fused ops replay the same tokens", 24, before)
    finally:
        fused_ops.ENABLED, fused_ops.DECODE_ATTENTION = was
    assert set(calls) == {"norm_rope", "softmax_topk", "decode_attention"} and engines[1].graphs
    assert_logits_close(want, got)
