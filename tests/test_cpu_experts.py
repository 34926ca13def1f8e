"""The CPU expert kernels against an fp32 reference: every path this CPU runs (MOEFLOW_CPU_KERNEL), token
counts, row ranges, thread counts, and the fallback when no compiler works."""

from __future__ import annotations

import os

import pytest
import torch

from moeflow import MoeflowError
from moeflow.config import CpuKernelConfig
from moeflow.experts import native
from moeflow.experts.cpu import CpuExperts, Job, jobs_from_topk, physical_cores
from moeflow.experts.local import partial_ffn
from moeflow.experts.store import expert_rows

LIB = native.load()
HERE = ["torch"] + ([k for k in native.KERNELS if LIB.can_run(k)] if LIB else [])
HARDWARE = ["avx512", "amx"]  # paths that need the CPU flags
EXACT = {"scalar", "avx2"}  # fp32 tokens and activations: only the summation order differs


def weights(E, H, I, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    return (torch.randn(E, 3 * I * H, generator=g) / H**0.5).bfloat16(), g


def reference(data, x, jobs, I):
    """fp32 on the same bf16 weights."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for j in jobs:
        gate, up, down_t = (m.float() for m in expert_rows(data[j.expert], I, j.r0, I if j.r1 is None else j.r1))
        out.index_add_(0, j.tok.long(), partial_ffn(x.float()[j.tok.long()], gate, up, down_t) * j.w[:, None])
    return out


def check(got, want, kernel):
    if want.numel() == 0:
        assert got.shape == want.shape
        return
    tol = (1e-4 if kernel in EXACT else 3e-2) * max(want.abs().max().item(), 1e-3)
    assert (got - want).abs().max().item() <= tol, (kernel, (got - want).abs().max().item(), tol)


def routed(N, E, K, g):
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else torch.zeros(0, K).long()
    return ids, torch.rand(N, K, generator=g)


@pytest.mark.parametrize("kernel", HERE)
@pytest.mark.parametrize("N,H,I,E,K", [(1, 128, 96, 6, 2), (5, 128, 48, 8, 3), (67, 64, 80, 4, 2),
                                       (9, 76, 40, 5, 5), (0, 128, 96, 6, 2)])
def test_layer_matches_fp32(monkeypatch, kernel, N, H, I, E, K):
    monkeypatch.setenv("MOEFLOW_CPU_KERNEL", kernel)
    data, g = weights(E, H, I)
    x = torch.randn(N, H, generator=g).bfloat16()
    ids, w = routed(N, E, K, g)
    ce = CpuExperts(threads=2)
    assert ce.kernel == kernel
    got = ce.layer(data, x, ids, w)
    assert got.shape == (N, H) and got.dtype == torch.float32
    check(got, reference(data, x, jobs_from_topk(ids, w, E), I), kernel)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kernel", HERE)
def test_row_ranges_add_up_and_out_accumulates(kernel, fused):
    H, I, E = 128, 112, 3
    data, g = weights(E, H, I)
    x = torch.randn(21, H, generator=g)  # fp32 tokens are accepted too
    tok = [torch.tensor([0, 3, 4, 20]), torch.arange(21), torch.tensor([7])]  # uneven tokens per expert
    ws = [torch.rand(len(t), generator=g) for t in tok]
    whole = [Job(e, tok[e], ws[e]) for e in range(E)]
    split = [Job(e, tok[e], ws[e], r0, r1) for e in range(E) for r0, r1 in ((0, 5), (5, 37), (37, 64), (64, I))]
    ce = CpuExperts(threads=2, kernel=kernel)
    if not fused:  # down by column chunks, as with many tokens
        ce.fused_max_bytes = 0
    base = torch.randn(21, H, generator=g)
    got = ce(data, x, split, base.clone())
    check(got - base, reference(data, x, whole, I), kernel)
    check(ce(data, x, whole), reference(data, x, whole, I), kernel)


@pytest.mark.parametrize("kernel", HERE)
def test_all_experts_and_none(kernel):
    H, I, E = 64, 32, 4
    data, g = weights(E, H, I)
    x = torch.randn(3, H, generator=g).bfloat16()
    ids, w = routed(3, E, E, g)
    ce = CpuExperts(threads=2, kernel=kernel)
    check(ce.layer(data, x, ids, w), reference(data, x, jobs_from_topk(ids, w, E), I), kernel)
    assert torch.equal(ce(data, x, []), torch.zeros(3, H))
    assert torch.equal(ce(data, x, [Job(1, torch.tensor([0]), torch.ones(1), 8, 8)]), torch.zeros(3, H))


@pytest.mark.skipif(LIB is None, reason="no native kernel here")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kernel", [k for k in HERE if k != "torch"])
def test_thread_count_is_honoured(kernel, fused):
    H, I, E = 256, 256, 4
    data, g = weights(E, H, I)
    x = torch.randn(4, H, generator=g).bfloat16()
    ids, w = routed(4, E, 2, g)
    one, two = CpuExperts(threads=1, kernel=kernel), CpuExperts(threads=2, kernel=kernel)
    if not fused:
        one.fused_max_bytes = two.fused_max_bytes = 0
    a, b = one.layer(data, x, ids, w), two.layer(data, x, ids, w)
    assert (one.threads_used, two.threads_used) == (1, 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # only the order of the per-thread sums differs


def test_threads_default_and_env(monkeypatch):
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.delenv("MOEFLOW_CPU_THREADS", raising=False)
    assert CpuExperts().threads == physical_cores()
    monkeypatch.setenv("MOEFLOW_CPU_THREADS", "1")
    assert CpuExperts().threads == 1


@pytest.mark.parametrize("kernel,amx_min", [("avx512", "16"), ("amx", "16"), ("amx", "1"), ("amx-emu", "4")])
def test_vector_and_tile_jobs_mixed(monkeypatch, kernel, amx_min):
    """AVX512-BF16 and AMX run where the CPU has them (the GPU host), skipped elsewhere; with AMX, jobs of
    fewer than amx_min_tokens tokens take the vector path in the same call."""
    if kernel not in HERE:
        pytest.skip(f"this CPU cannot run {kernel} (flags: avx512_bf16 / amx_bf16, amx_tile)")
    H, I, E = 512, 320, 4
    data, g = weights(E, H, I)
    for N in (1, 3, 16, 40, 90):
        x = torch.randn(N, H, generator=g).bfloat16()
        ids, w = routed(N, E, 2, g)
        ce = CpuExperts(kernel=kernel, config=CpuKernelConfig(amx_min_tokens=int(amx_min)))
        check(ce.layer(data, x, ids, w), reference(data, x, jobs_from_topk(ids, w, E), I), kernel)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", ["amx-emu", "amx"])
def test_amx_blocking_moves_no_sum(kernel, threads):
    """The AMX blocking (rows of down_t per chunk, of H per gate/up slice, rows per gate/up block) only decides
    where the fp32 sums wait between chunks, not their order: every blocking gives the same bits. Sizes give
    several chunks and slices with partial last ones, 256-column blocks with a partial one (640 columns per
    thread, or 320), odd and partial token groups, row ranges that are not multiples of a chunk, and R % 32
    of 8, 16 and 24 (a 16-row half tile past R that gate/up never writes)."""
    if kernel not in HERE:
        pytest.skip(f"this CPU cannot run {kernel} (flags: amx_bf16, amx_tile)")
    H, I = 640, 232
    data, g = weights(2, H, I)
    x = torch.randn(50, H, generator=g)
    tok = [torch.randperm(50, generator=g)[:40], torch.arange(50), torch.tensor([3, 7, 11] * 5 + [1, 2])]
    ws = [torch.rand(len(t), generator=g) for t in tok]
    jobs = [Job(0, tok[0], ws[0]), Job(1, tok[1], ws[1], 0, 80), Job(1, tok[2], ws[2], 80, I)]
    ce = CpuExperts(threads=threads, kernel=kernel)
    # NaN left in the scratch (the next call's activations lie where these tokens were packed) must not leak:
    # the activation rows past R, multiplied by zero rows of down_t, are zeroed, not assumed clean.
    ce(data, torch.full_like(x, float("nan")), [Job(1, tok[1], ws[1])])
    outs = []
    for blocking in (native.AMX_BLOCKING, (64, 96, 32), (32, 32, 16), (96, 4096, 256)):
        ce.amx_blocking = blocking
        outs.append(ce(data, x, jobs))
    check(outs[0], reference(data, x, jobs, I), kernel)
    for got in outs[1:]:
        assert torch.equal(got, outs[0])


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("MOEFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOEFLOW_CPU_KERNEL", raising=False)
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="native CPU expert kernel is unavailable"):
        ce = CpuExperts()
    assert ce.kernel == "torch" and ce.native is None
    data, g = weights(3, 64, 32)
    x = torch.randn(2, 64, generator=g).bfloat16()
    ids, w = routed(2, 3, 2, g)
    check(ce.layer(data, x, ids, w), reference(data, x, jobs_from_topk(ids, w, 3), 32), "torch")
    monkeypatch.setenv("CXX", "no-such-compiler-moeflow")
    with pytest.warns(RuntimeWarning):
        assert native.load() is None


def test_unknown_or_unavailable_kernel_is_refused(monkeypatch):
    from moeflow import MoeflowError

    with pytest.raises(MoeflowError, match="choose"):
        CpuExperts(kernel="sse9")
    missing = [k for k in HARDWARE if k not in HERE]
    if LIB is not None and missing:
        with pytest.raises(MoeflowError, match="cannot run"):
            CpuExperts(kernel=missing[0])


@pytest.mark.skipif(LIB is None, reason="no native kernel here")
def test_bf16_host_store_runs_the_kernel_locally_and_offloaded():
    """`generate --device cpu` of a bf16 model and the offloading engine's CPU part both run the kernel: with
    every expert on the CPU (policy cpu) they compute the same sums, so the greedy tokens are identical."""
    from conftest import budget_for

    from moeflow.checkpoint import load
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams

    params, prompt, max_len = SamplingParams(max_new_tokens=8, ignore_eos=True), list(range(3, 20)), 64
    ck = load("synthetic:tiny-mixtral", dtype="bf16")
    (want,) = LLMEngine(ck, max_seqs=1, max_len=max_len).generate([prompt], params)
    assert ck.model.experts.cpu.uses_native(ck.store.data) and ck.model.experts.cpu.threads_used >= 1

    ck = load("synthetic:tiny-mixtral", dtype="bf16", expert_device="cpu")
    budget = budget_for(ck, 2, max_seqs=1, max_len=max_len)
    engine = LLMEngine(ck, max_seqs=1, max_len=max_len, offload=OffloadConfig(budget, "cpu"))
    (got,) = engine.generate([prompt], params)
    experts = engine.model.experts
    assert experts.stats.cpu_experts > 0 and experts.cpu.threads_used >= 1
    assert got.output_ids == want.output_ids


def test_the_kernels_own_reads_set_the_cpu_read_ceiling(monkeypatch):
    """The CPU's read ceiling is the fastest of its readers, the kernel's streaming reads among them (a ceiling
    below what the kernel reaches would not be one)."""
    from moeflow.bench import ceilings
    from moeflow.experts.native import load

    kernel = load()
    if kernel is None:
        pytest.skip("the native kernel cannot be built here")
    rate = kernel.read_bw(2, torch.randn(1 << 22))
    assert 1e8 < rate < 1e13  # bytes/s: 100 MB/s to 10 TB/s
    monkeypatch.setattr(ceilings, "native_read_bw", lambda src, threads, repeats: 1e15)
    assert ceilings.memory_bandwidth(torch.device("cpu"), 1 << 22) == 1e15
    monkeypatch.setattr(ceilings, "native_read_bw", lambda src, threads, repeats: 0.0)
    rates = ceilings.cpu_read_ceiling(1 << 22)
    assert set(rates) == {"torch_sum", "numpy_sum", "copy"} and all(0 < r < 1e15 for r in rates.values())


def test_the_read_ceiling_is_not_below_a_plain_numpy_reduction():
    """The meter must not under-read the host: a plain NumPy sum, timed here on its own, reads no faster than
    the ceiling (beyond the noise of a shared machine)."""
    import time

    import numpy as np

    from moeflow.bench.ceilings import memory_bandwidth

    nbytes = 64 << 20
    arr = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    arr.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        arr.sum()
        best = min(best, time.perf_counter() - t)
    assert memory_bandwidth(torch.device("cpu"), nbytes) >= 0.7 * nbytes / best


@pytest.mark.skipif(LIB is None, reason="no native kernel here")
@pytest.mark.parametrize("kernel", [k for k in HERE if k != "torch"])
def test_every_kernel_setting_keeps_the_results(kernel):
    """The settings of CpuKernelConfig (rows per gate/up pass, down in registers, prefetch distance, pinned
    workers, spin before sleeping: none, so every phase wakes the workers, or long) move no result: each call of
    a layer, from 1 to 12 tokens, gives the fp32 reference. H = 200 leaves partial vectors at every width."""
    data, g = weights(6, 200, 44, seed=1)
    for cfg in (CpuKernelConfig(gemv_rows=2, prefetch=256, spin=0), CpuKernelConfig(gemv_rows=4, down_direct=True),
                CpuKernelConfig(gemv_rows=4, down_direct=True, prefetch=1024, pin=True, spin=100000),
                CpuKernelConfig()):
        ce = CpuExperts(threads=3, kernel=kernel, config=cfg)
        for n in (1, 2, 3, 5, 8, 12, 1):
            x = torch.randn(n, 200, generator=g).bfloat16()
            ids, w = routed(n, 6, 2, g)
            check(ce.layer(data, x, ids, w), reference(data, x, jobs_from_topk(ids, w, 6), 44), kernel)
            jobs = [Job(1, torch.arange(n), torch.rand(n, generator=g), 3, 41)]  # odd row range: partial passes
            check(ce(data, x, jobs), reference(data, x, jobs, 44), kernel)
        assert ce.threads_used == 3


def test_kernel_config_is_checked():
    for bad in (dict(kernel="sse9"), dict(threads=0), dict(gemv_rows=3), dict(prefetch=-1), dict(quant_vnni=3),
                dict(quant_prefetch=-1), dict(quant_prefetch=(1 << 20) + 1)):
        with pytest.raises(MoeflowError):
            CpuKernelConfig(**bad)


def test_many_runs_the_next_experts_in_one_call():
    data, g = weights(4, 64, 32)
    x = torch.randn(3, 64, generator=g).bfloat16()
    ce = CpuExperts()
    fn = ce.many(2, data)
    for first in (0, 2, 0):  # rotates through the blocks, two at a time
        want = ce.expert(x, data[first]) + ce.expert(x, data[first + 1])
        torch.testing.assert_close(fn(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(LIB is None, reason="no native kernel here")
def test_handed_over_calls_with_changing_thread_counts():
    """Calls handed to the kernel's own thread (submit) and made here (inline), with thread counts that change
    between calls and between the phases of one call (the pool releases the workers a phase does not need),
    and pauses that let every worker fall asleep: each gives the fp32 reference, and an unread call is waited
    for before its inputs go."""
    import time

    data, g = weights(6, 128, 96, seed=3)
    for threads in (2, 5, 3, 8, 1, 4):
        ce = CpuExperts(threads=threads)
        for n in (1, 7, 2):
            x = torch.randn(n, 128, generator=g).bfloat16()
            ids, w = routed(n, 6, 2, g)
            jobs = jobs_from_topk(ids, w, 6)
            call = ce.submit(data, x, jobs)
            time.sleep(0.002)
            check(call.result(), reference(data, x, jobs, 96), ce.kernel)
            assert call.busy_s > 0 and call.start_s >= 0 and ce.kernel_s > 0
            check(ce(data, x, jobs), reference(data, x, jobs, 96), ce.kernel)
    big, _ = weights(4, 1024, 2048, seed=4)  # ~50 MB: still running when dropped
    x = torch.randn(1, 1024, generator=g).bfloat16()
    jobs = jobs_from_topk(torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]]), 4)
    dropped = ce.submit(big, x, jobs)
    del dropped  # waits for the kernel, so the next hand-over is accepted (else: "a call is already under way")
    check(ce.submit(big, x, jobs).result(), reference(big, x, jobs, 2048), ce.kernel)


def test_bf16_activations_widen_exactly_without_pytorch_ops():
    from moeflow.experts.cpu import _fp32

    x = torch.randn(6, 9).to(torch.bfloat16)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = float("-inf"), float("nan"), -0.0, -3.0e38
    for v in (x, x.t(), x[:, 1:5]):  # contiguous, transposed, sliced
        y = _fp32(v)
        assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == v.shape
        assert torch.equal(y.view(torch.int32), v.float().contiguous().view(torch.int32))  # bit for bit
    f = torch.randn(3, 4)
    assert _fp32(f) is f


def test_amx_peak_measures_the_tile_units_or_says_none():
    """moe_amx_peak: FLOP/s of tile products alone, and lower once their operands load from an L2-sized buffer;
    0 where the CPU has no AMX (no crash, no guess)."""
    if LIB is None:
        pytest.skip("no native kernel here")
    alone, fed = LIB.amx_peak(2, iters=20_000), LIB.amx_peak(2, loads=3, span=1 << 20, iters=20_000)
    if not LIB.can_run("amx"):
        assert alone == fed == 0.0
        return
    assert 1e11 < alone < 1e15 and 0 < fed < 1.2 * alone


def test_bench_variants_parse_into_configs():
    from moeflow.bench.cpu_experts import parse_variants

    base = CpuKernelConfig(threads=3)
    got = parse_variants("gemv_rows=4,pin=1;prefetch=512", base)
    assert got == [("gemv_rows=4,pin=1", CpuKernelConfig(threads=3, gemv_rows=4, pin=True)),
                   ("prefetch=512", CpuKernelConfig(threads=3, prefetch=512))]
    assert parse_variants(None, base) == []
    for bad in ("gemv_rows=x", "colour=1", "kernel=1", "gemv_rows=3"):
        with pytest.raises(MoeflowError):
            parse_variants(bad, base)


@pytest.mark.skipif(LIB is None, reason="no native kernel here")
@pytest.mark.parametrize("kernel", [k for k in HERE if k != "torch"])
def test_results_do_not_depend_on_which_thread_ran_which_rows(kernel):
    """Threads claim row chunks as they come (more threads than cores here, so the claims differ from call to
    call); the down sums are kept per chunk and reduced in order, so repeated calls agree bit for bit."""
    H, I, E = 128, 1024, 4
    data, g = weights(E, H, I, seed=3)
    ce = CpuExperts(threads=4 * physical_cores(), kernel=kernel)
    for N in (1, 3):
        x = torch.randn(N, H, generator=g).bfloat16()
        ids, w = routed(N, E, 2, g)
        outs = [ce.layer(data, x, ids, w) for _ in range(6)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        check(outs[0], reference(data, x, jobs_from_topk(ids, w, E), I), kernel)


@pytest.mark.skipif(LIB is None, reason="no C++ compiler builds the native kernel")
def test_the_kernels_run_in_a_child_forked_after_a_call():
    """A child forked after the kernels' workers started has none of them: its first call starts its own (it
    used to wait for the parent's forever), for the expert kernel and the CPU attention kernel alike."""
    import signal
    import time

    import numpy as np

    from moeflow.pipeline.attention import cpu_decode_attention
    from moeflow.pipeline.native import load as load_attention

    data, g = weights(4, 64, 32, seed=0)
    x = torch.randn(3, 64, generator=g).bfloat16()
    ids, w = routed(3, 4, 2, g)
    ce = CpuExperts(threads=3)
    cache = [torch.randn(3 * 8, 2, 16, generator=g) for _ in "kv"]
    q, k, v = (torch.randn(3, h, 16, generator=g) for h in (4, 2, 2))

    def calls() -> list[np.ndarray]:
        attn = cpu_decode_attention(q, k, v, *[c.clone() for c in cache], [0, 8, 16], [7, 3, 5], None,
                                    load_attention(), 3)
        return [ce.layer(data, x, ids, w).numpy(), attn.numpy()]

    want = calls()  # the workers start here
    pid = os.fork()
    if pid == 0:  # the child: straight out, never back into pytest
        code = 1
        try:
            code = int(not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(calls(), want)))
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's first kernel call never returned")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0
