"""The native CPU kernel on group-wise int4/int8 experts (quant/format.py) against the weights dequantized in
fp32: every format variant, every kernel this CPU runs, token counts, row ranges, and calls split by tokens.
The fp32 paths dequantize exactly ((q - z) * s is exact in fp32), so only the summation order differs: tolerance
1e-4 of the largest output. The AVX2 integer-dot path (quant_int8_tokens) rounds gate/up's tokens to int8 per
weight group (and, int4 in groups of 64k at one or two tokens, down's coefficients to 15 bits): 1e-4 against
the same token rounding done in PyTorch, 3e-2 against the unrounded tokens."""

from __future__ import annotations

import pytest
import torch

from moeflow.config import CpuKernelConfig
from moeflow.experts import native
from moeflow.experts.cpu import CpuExperts, Job, jobs_from_topk, physical_cores
from moeflow.experts.ffn import partial_ffn
from moeflow.quant.format import ExpertFormat, QuantSpec

LIB = native.load()
KERNELS = [k for k in native.KERNELS if LIB and LIB.can_run(k)]
SPECS = [QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), QuantSpec(4, 128, scale_dtype=torch.float16),
         QuantSpec(8, 64), QuantSpec(8, 32, symmetric=False, scale_dtype=torch.float16), QuantSpec(8, 128, False)]
pytestmark = pytest.mark.skipif(LIB is None, reason="the native kernel does not build here")


def vnni_mode(mode: int) -> int:
    """quant_vnni for a test: 0 AVX2, 2 the VNNI code emulated (any x86-64), 1 AVX512-VNNI (skipped without it)."""
    if mode == 1 and "avx512vnni" not in LIB.features:
        pytest.skip("this CPU has no AVX512-VNNI")
    return mode


def quantized(spec, E=4, H=256, I=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = ExpertFormat(I, H, torch.bfloat16, spec)
    data = torch.empty(E, fmt.block_numel, dtype=torch.uint8)
    for e in range(E):
        w = torch.randn(3, I, H, generator=g) / H**0.5 + 0.02  # an offset: asymmetric groups get zero points
        fmt.pack(w[0], w[1], w[2], data[e])
    return data, fmt, g


def reference(data, fmt, x, jobs, rounded=False):
    """The jobs in fp32 on the dequantized weights; rounded: gate/up see the tokens rounded as int8 per group."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for j in jobs:
        r1 = fmt.inter if j.r1 is None else j.r1
        gate, up, down_t = fmt.rows(data[j.expert], j.r0, r1, torch.float32)
        tok = torch.as_tensor(j.tok).long()
        xt = round_int8(x.float()[tok], fmt.spec.group_size) if rounded else x.float()[tok]
        out.index_add_(0, tok, partial_ffn(xt, gate, up, down_t) * torch.as_tensor(j.w)[:, None])
    return out


def round_int8(x, group):
    """x [n, H] rounded to int8 per group of the weights with the scale amax / 127, as the integer-dot path does."""
    c = x.reshape(x.shape[0], -1, group)
    amax = c.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(c * inv) * (amax / 127)).reshape(x.shape)


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
    cfg = CpuKernelConfig(quant_avx512=avx512, int4_bf16=int4_bf16, quant_int8_tokens=0)
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
    cfg = CpuKernelConfig(fused_max_bytes=40_000, quant_int8_tokens=0)
    small = CpuExperts(threads=2, kernel=kernel, fmt=fmt, config=cfg)
    assert len(small._token_parts(jobs, 256)) > 1
    close(small(data, x, jobs), want)
    close(small.submit(data, x, jobs).result(), want)
    close(small.layer(data, x, ids, w), want)  # over the budget: as jobs, in parts
    whole = CpuExperts(threads=2, kernel=kernel, fmt=fmt, config=CpuKernelConfig(quant_int8_tokens=0))
    close(whole.submit(data, x, jobs).result(), want)
    close(whole.layer(data, x, ids, w), want)  # grouped by expert in C


def test_formats_without_a_native_path_fall_back_to_pytorch():
    spec = QuantSpec(4, 48)  # a group size that is not a multiple of 32
    fmt = ExpertFormat(8, 96, torch.bfloat16, spec)
    data = torch.zeros(2, fmt.block_numel, dtype=torch.uint8)
    ce = CpuExperts(threads=2, fmt=fmt)
    assert ce.qfmt is None and not ce.uses_native(data)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("vnni", [0, 1, 2], ids=["avx2", "vnni", "vnni-emulated"])
def test_integer_dot_path_matches_int8_rounded_tokens(spec, vnni):
    """Jobs of up to quant_int8_tokens tokens (AVX2): gate/up as integer dot products on int8 tokens, exactly the
    rounding of round_int8; larger jobs of the same call stay fp32; and close to the unrounded fp32 result. With
    quant_vnni, one-token int4 jobs in groups of 64 or 128 take the VNNI code: the same integer sums."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(spec, seed=2)
    cfg = CpuKernelConfig(quant_int8_tokens=4, quant_int8_on_int8=True, quant_vnni=vnni_mode(vnni))
    ce = CpuExperts(threads=2, kernel="avx2", fmt=fmt, config=cfg)
    for N in (1, 2, 5, 12):
        x = torch.randn(N, 256, generator=g)  # fp32: bf16 values land on rounding ties (x = amax / 2)
        jobs = [Job(0, torch.arange(N), torch.rand(N, generator=g), 0, 40),
                Job(1, torch.arange(min(N, 3)), torch.rand(min(N, 3), generator=g), 7, 33),
                Job(2, torch.arange(N)[:1], torch.rand(1, generator=g), 0, 40)]
        got = ce(data, x, jobs)
        exact = sum(reference(data, fmt, x, [j], rounded=len(j.tok) <= 4) for j in jobs)
        close(got, exact)
        close(got, reference(data, fmt, x, jobs), tol=3e-2)


@pytest.mark.parametrize("spec,H", [(QuantSpec(4, 64), 320), (QuantSpec(4, 128, symmetric=False), 384)],
                         ids=["int4-g64-5-groups", "int4-g128-asym-3-groups"])
@pytest.mark.parametrize("vnni", [0, 1, 2], ids=["avx2", "vnni", "vnni-emulated"])
def test_one_token_integer_dots_take_an_odd_number_of_groups(spec, H, vnni):
    """Decode's one-token gate/up path takes groups two at a time: a row with an odd count ends on one."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(spec, H=H, seed=3)
    ce = CpuExperts(threads=2, kernel="avx2", fmt=fmt, config=CpuKernelConfig(quant_vnni=vnni_mode(vnni)))
    x = torch.randn(1, H, generator=g)
    jobs = [Job(0, torch.arange(1), torch.rand(1, generator=g), 0, 40),
            Job(3, torch.arange(1), torch.rand(1, generator=g), 5, 29)]
    close(ce(data, x, jobs), sum(reference(data, fmt, x, [j], rounded=True) for j in jobs))


@pytest.mark.parametrize("vnni", [0, 1, 2], ids=["avx2", "vnni", "vnni-emulated"])
def test_one_token_down_ends_a_chunk_on_a_partial_block(vnni):
    """Down takes rows 16 at a time (4 at a time by VNNI): a chunk of 64 rows and then one of 22 (a block of 16 and
    one of 6) must not reuse the full block's coefficients for the partial one's missing rows."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(QuantSpec(4, 64), E=1, I=214, seed=4)
    ce = CpuExperts(threads=1, kernel="avx2", fmt=fmt, config=CpuKernelConfig(quant_vnni=vnni_mode(vnni)))
    x = torch.randn(1, 256, generator=g)
    jobs = [Job(0, torch.arange(1), torch.rand(1, generator=g), 0, 214)]
    close(ce(data, x, jobs), reference(data, fmt, x, jobs, rounded=True))


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 64)], ids=lambda s: s.name)
def test_integer_dots_are_the_default_for_int4_decode_only(spec):
    """The default settings: int4 experts of up to 8 tokens take the integer-dot path, int8 experts stay fp32."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(spec, seed=3)
    x = torch.randn(3, 256, generator=g)
    jobs = [Job(0, torch.arange(3), torch.rand(3, generator=g))]
    got = CpuExperts(threads=2, kernel="avx2", fmt=fmt)(data, x, jobs)
    close(got, reference(data, fmt, x, jobs, rounded=spec.bits == 4))


def test_an_fp32_model_keeps_its_int4_tokens_in_fp32():
    """The defaults round decode tokens to int8 for bf16 models only: an fp32 model's int4 experts match the
    dequantized weights in fp32 to summation order (its greedy tokens are the all-on-GPU run's)."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(QuantSpec(4, 64), seed=3)
    fp32 = ExpertFormat(fmt.inter, fmt.hidden, torch.float32, fmt.spec)  # the same blocks, an fp32 model's
    x = torch.randn(3, 256, generator=g)
    jobs = [Job(0, torch.arange(3), torch.rand(3, generator=g))]
    close(CpuExperts(threads=2, kernel="avx2", fmt=fp32)(data, x, jobs), reference(data, fmt, x, jobs))


@pytest.mark.parametrize("kernel", KERNELS[:2])
@pytest.mark.parametrize("int8_tokens", [0, 8])
def test_quantized_results_do_not_depend_on_which_thread_ran_which_rows(kernel, int8_tokens):
    """As for bf16: row chunks claimed as they come, sums per chunk reduced in order, bit-for-bit repeatable."""
    spec = QuantSpec(4, 64, symmetric=False)
    data, fmt, g = quantized(spec, I=640, seed=2)
    cfg = CpuKernelConfig(quant_int8_tokens=int8_tokens)
    ce = CpuExperts(threads=4 * physical_cores(), kernel=kernel, fmt=fmt, config=cfg)
    for N in (1, 5):
        x = torch.randn(N, 256, generator=g).bfloat16()
        ids, w = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(N)]), torch.rand(N, 2, generator=g)
        outs = [ce.layer(data, x, ids, w) for _ in range(6)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        rounded = kernel == "avx2" and int8_tokens >= N  # the integer-dot path
        close(outs[0], reference(data, fmt, x, jobs_from_topk(ids, w, 4), rounded=rounded))


def test_a_quantized_calls_phases_split_gate_up_from_down():
    """moe_last_phases of a quantized call: preparation, gate/up and down, where gate/up and down run fused per row
    chunk; down reads a third of the bytes, so its share of the time is far from none (loose bounds: a timing)."""
    if "avx2" not in KERNELS:
        pytest.skip("needs the AVX2 code")
    data, fmt, g = quantized(QuantSpec(4, 64), E=1, H=1024, I=2048, seed=5)
    ce = CpuExperts(threads=2, kernel="avx2", fmt=fmt)
    x, jobs = torch.randn(1, 1024, generator=g), [Job(0, torch.arange(1), torch.ones(1), 0, 2048)]
    shares = []
    for _ in range(7):
        ce(data, x, jobs)
        prep, gate_up, down = ce.native.last_phases()
        assert min(prep, gate_up, down) >= 0
        shares.append(down / (gate_up + down))
    assert 0.1 < sorted(shares)[3] < 0.9, shares


@pytest.mark.parametrize("vnni", [0, 2], ids=["avx2", "vnni-emulated"])
def test_the_prefetch_distance_leaves_the_sums_alone(vnni):
    """quant_prefetch only moves software prefetches: one token (the one-token loops) and three tokens (the tile
    path) give the same bits at no prefetch, a line and the default distance."""
    if "avx2" not in KERNELS:
        pytest.skip("the integer-dot path is AVX2 code")
    data, fmt, g = quantized(QuantSpec(4, 64, symmetric=False), seed=5)
    x = torch.randn(3, 256, generator=g)
    jobs = [Job(0, torch.arange(1), torch.ones(1), 0, 40), Job(1, torch.arange(3), torch.rand(3, generator=g), 0, 40)]
    outs = []
    for pf in (0, 64, CpuKernelConfig().quant_prefetch):
        cfg = CpuKernelConfig(quant_vnni=vnni, quant_prefetch=pf)
        outs.append(CpuExperts(threads=2, kernel="avx2", fmt=fmt, config=cfg)(data, x, jobs))
    assert outs[0].abs().max() > 0
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
