"""The native CPU kernel on group-wise int4/int8 experts (quant/format.py) against the weights dequantized in
fp32: every format variant, every kernel this CPU runs, token counts, row ranges, and calls split by tokens.
The kernel dequantizes exactly ((q - z) * s is exact in fp32), so only the summation order differs: tolerance
1e-4 of the largest output."""

from __future__ import annotations

import pytest
import torch

from moeflow.config import CpuKernelConfig
from moeflow.experts import native
from moeflow.experts.cpu import CpuExperts, Job, jobs_from_topk
from moeflow.experts.ffn import partial_ffn
from moeflow.quant.format import ExpertFormat, QuantSpec

LIB = native.load()
KERNELS = [k for k in native.KERNELS if LIB and LIB.can_run(k)]
SPECS = [QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), QuantSpec(4, 128, scale_dtype=torch.float16),
         QuantSpec(8, 64), QuantSpec(8, 32, symmetric=False, scale_dtype=torch.float16), QuantSpec(8, 128, False)]
pytestmark = pytest.mark.skipif(LIB is None, reason="the native kernel does not build here")


def quantized(spec, E=4, H=256, I=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = ExpertFormat(I, H, torch.bfloat16, spec)
    data = torch.empty(E, fmt.block_numel, dtype=torch.uint8)
    for e in range(E):
        w = torch.randn(3, I, H, generator=g) / H**0.5 + 0.02  # an offset: asymmetric groups get zero points
        fmt.pack(w[0], w[1], w[2], data[e])
    return data, fmt, g


def reference(data, fmt, x, jobs):
    out = torch.zeros(x.shape[0], x.shape[1])
    for j in jobs:
        r1 = fmt.inter if j.r1 is None else j.r1
        gate, up, down_t = fmt.rows(data[j.expert], j.r0, r1, torch.float32)
        tok = torch.as_tensor(j.tok).long()
        out.index_add_(0, tok, partial_ffn(x.float()[tok], gate, up, down_t) * torch.as_tensor(j.w)[:, None])
    return out


def close(got, want, tol=1e-4):
    err = (got - want).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), 1e-3), err


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("avx512,int4_bf16", [(False, False), (True, False), (True, True)])
def test_native_quantized_layer_matches_dequantized_fp32(kernel, spec, avx512, int4_bf16):
    """avx512 (quant_avx512): the AVX-512 code where avx512 or amx runs (else AVX2 code); int4_bf16 (int4 in
    groups of 64k): gate/up by vdpbf16ps, exact here as the tokens are bf16."""
    if avx512 and kernel not in ("avx512", "amx"):
        pytest.skip("quant_avx512 applies where the avx512 or amx kernel runs")
    if int4_bf16 and not (spec.bits == 4 and spec.group_size % 64 == 0):
        pytest.skip("int4_bf16 applies to int4 in groups of 64 or 128")
    data, fmt, g = quantized(spec)
    cfg = CpuKernelConfig(quant_avx512=avx512, int4_bf16=int4_bf16)
    ce = CpuExperts(threads=3, kernel=kernel, fmt=fmt, config=cfg)
    assert ce.uses_native(data)
    for N in (1, 3, 9):
        x = torch.randn(N, 256, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(N)])
        w = torch.rand(N, 2, generator=g)
        jobs = jobs_from_topk(ids, w, 4)
        close(ce.layer(data, x, ids, w), reference(data, fmt, x, jobs))
        assert ce.threads_used >= 1 and ce.kernel_s > 0
        parts = [Job(1, torch.arange(N), torch.rand(N, generator=g), 0, 13),  # row ranges; out accumulates
                 Job(1, torch.arange(N), torch.rand(N, generator=g), 13, 40)]
        base = torch.randn(N, 256, generator=g)
        close(ce(data, x, parts, base.clone()) - base, reference(data, fmt, x, parts))


@pytest.mark.parametrize("kernel", KERNELS[:2])
def test_calls_split_by_tokens_and_handed_over_give_the_same(kernel):
    """Per-thread sums over the budget: the call runs in token parts; handed to the kernel's thread or not."""
    spec = QuantSpec(4, 64, symmetric=False)
    data, fmt, g = quantized(spec, seed=1)
    x = torch.randn(20, 256, generator=g).bfloat16()
    ids, w = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(20)]), torch.rand(20, 2, generator=g)
    jobs = jobs_from_topk(ids, w, 4)
    want = reference(data, fmt, x, jobs)
    small = CpuExperts(threads=2, kernel=kernel, fmt=fmt, config=CpuKernelConfig(fused_max_bytes=40_000))
    assert len(small._token_parts(jobs, 256)) > 1
    close(small(data, x, jobs), want)
    close(small.submit(data, x, jobs).result(), want)
    whole = CpuExperts(threads=2, kernel=kernel, fmt=fmt)
    close(whole.submit(data, x, jobs).result(), want)


def test_formats_without_a_native_path_fall_back_to_pytorch():
    spec = QuantSpec(4, 48)  # a group size that is not a multiple of 32
    fmt = ExpertFormat(8, 96, torch.bfloat16, spec)
    data = torch.zeros(2, fmt.block_numel, dtype=torch.uint8)
    ce = CpuExperts(threads=2, fmt=fmt)
    assert ce.qfmt is None and not ce.uses_native(data)
