"""Quantized experts: the block format against values packed by hand, quantize -> dequantize error bounds, and
every offloading policy giving the all-on-one-device tokens on a tiny int4/int8 model (the CPU as both tiers)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.budget import step_workspace
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.waves import GRAPH_MAX_ENTRIES
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import POLICIES
from moeflow.quant import grouped as qgrouped
from moeflow.quant.format import ExpertFormat, QuantSpec, dequantize, parse_quant, quantize

MAX_LEN = 64
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
SPECS = [QuantSpec(4, 32), QuantSpec(4, 64, False), QuantSpec(8, 64), QuantSpec(8, 32, False, torch.float16),
         QuantSpec(4, 128, True, torch.float16), QuantSpec(8, 128, False)]


def test_parse_quant_names_and_refuses_what_is_not_supported():
    assert parse_quant("int4") == QuantSpec(4, 64, True, torch.bfloat16)
    assert parse_quant("int8-g128-asym-fp16") == QuantSpec(8, 128, False, torch.float16)
    assert parse_quant(None) is None and parse_quant("none") is None
    assert parse_quant(QuantSpec(4, 32, False).name) == QuantSpec(4, 32, False)
    for bad, word in (("int3", "3-bit"), ("int4-g16", "group size 16"), ("fp4", "--quantize 'fp4'")):
        with pytest.raises(MoeflowError, match=word):
            parse_quant(bad)
    with pytest.raises(MoeflowError, match="not a multiple"):
        ExpertFormat(8, 96, torch.bfloat16, QuantSpec(4, 64))


def test_int4_symmetric_record_packed_by_hand():
    """One row of H = 64 in groups of 32: w = (q - 8) * s, the even index in the low nibble, then the bf16 scales."""
    fmt = ExpertFormat(1, 64, torch.float32, QuantSpec(4, 32))
    codes = torch.tensor([(i * 5) % 15 - 7 for i in range(64)])          # -7..7, both extremes present
    scales = torch.tensor([0.5, 0.125])                                   # exact in bf16
    w = codes.float() * scales.repeat_interleave(32)
    rec = quantize(w[None], fmt)[0]
    q = (codes + 8).tolist()
    want = [q[2 * k] | (q[2 * k + 1] << 4) for k in range(32)]
    want += list(torch.tensor([0.5, 0.125], dtype=torch.bfloat16).view(torch.uint8).tolist())
    assert rec.tolist() == want and fmt.record == 32 + 4
    assert torch.equal(dequantize(rec[None], fmt, torch.float32)[0], w)


def test_int8_asymmetric_record_packed_by_hand():
    """H = 32, one group: w = (q - z) * s with q a byte, then the scale and the zero point, fp16."""
    fmt = ExpertFormat(1, 32, torch.float32, QuantSpec(8, 32, False, torch.float16))
    s, z = 0.25, 40
    codes = torch.tensor([0, 255] + [(7 * i) % 256 for i in range(30)])
    w = (codes.float() - z) * s
    rec = quantize(w[None], fmt)[0]
    want = codes.tolist() + torch.tensor([s], dtype=torch.float16).view(torch.uint8).tolist() + \
        torch.tensor([float(z)], dtype=torch.float16).view(torch.uint8).tolist()
    assert rec.tolist() == want
    assert torch.equal(dequantize(rec[None], fmt, torch.float32)[0], w)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_quantize_dequantize_error_is_within_the_rounding_bound(spec):
    """Round-to-nearest: each value within half a step of its group's scale (symmetric) or one step
    (asymmetric: the zero point is rounded too), +1% for the scale's own rounding; zero stays zero."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * torch.logspace(-3, 1, 24)[:, None]
    w[3, :spec.group_size] = 0.0
    fmt = ExpertFormat(24, 256, torch.float32, spec)
    back = dequantize(quantize(w, fmt), fmt, torch.float32)
    grouped = w.view(24, -1, spec.group_size)
    if spec.symmetric:
        step, bound = grouped.abs().amax(-1) / ((1 << (spec.bits - 1)) - 1), 0.5
    else:
        step, bound = (grouped.amax(-1).clamp(min=0) - grouped.amin(-1).clamp(max=0)) / spec.qmax, 1.0
    err = (back - w).abs().view(24, -1, spec.group_size).amax(-1)
    assert (err <= bound * step * 1.01 + 1e-12).all()
    assert torch.equal(back[3, :spec.group_size], torch.zeros(spec.group_size))
    rel = (back - w).norm() / w.norm()
    assert rel < (0.15 if spec.bits == 4 else 0.01)  # Gaussian rows: about step / sqrt(12) / std


def test_row_ranges_are_three_contiguous_runs_and_dequantize_alike():
    fmt = ExpertFormat(16, 64, torch.float32, QuantSpec(4, 32, False))
    mats = [torch.randn(16, 64) for _ in range(3)]
    block = torch.empty(fmt.block_numel, dtype=torch.uint8)
    fmt.pack(*mats, block)
    whole = fmt.rows(block, 0, 16)
    for r0, r1 in ((0, 5), (5, 16), (7, 8)):
        runs = fmt.runs(block, r0, r1)
        assert all(r.is_contiguous() and r.shape == (r1 - r0, fmt.record) for r in runs)
        assert all(torch.equal(a, b[r0:r1]) for a, b in zip(fmt.rows(block, r0, r1), whole))
    assert fmt.block_bytes == block.numel() == 3 * 16 * (32 + 2 * 2 * 2)


def tiny_budget(ck, slots: int, max_seqs: int = 2) -> int:
    """A GPU budget leaving exactly `slots` expert slots of the store's real (quantized) size."""
    kv = ck.cfg.kv_bytes_per_token(ck.store.dtype) * max_seqs * MAX_LEN
    cuda = next(ck.model.parameters()).is_cuda  # the engine counts a pass of dequantized weights there
    dequant = qgrouped.workspace_bytes(ck.store.fmt, GRAPH_MAX_ENTRIES, ck.cfg.num_experts) if cuda else 0
    return ck.dense_bytes + kv + step_workspace(ck.cfg, kv, MAX_LEN, ck.store.dtype.itemsize, max_seqs) + \
        slots * ck.store.expert_bytes + dequant


def costs_table(cpu_per_token: float, copy: float) -> ExpertCosts:
    pts = (1, 4, 16, 64, 256)
    return ExpertCosts(pts, tuple(cpu_per_token * n for n in pts), tuple(1e-5 for _ in pts), copy)


def generate(path, quant, offload=None, costs=None, calibrate=False):
    """Greedy tokens of two prompts; offload: the latency regime with hand-made costs (not measured: fast),
    corrected on line where calibrate."""
    from moeflow.experts.offload import OffloadedExperts

    ck = load(path, device="cpu", expert_device="cpu", quant=quant)
    if offload is not None:
        offload = OffloadConfig(tiny_budget(ck, offload.pop("slots")), **offload)
    costs = costs or costs_table(1e-3, 1e-3)
    with mock.patch.object(OffloadedExperts, "measure_costs", lambda self: costs):
        engine = LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=offload)
    if offload is not None:
        engine.model.experts.calibrate = calibrate
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 310, (n,), generator=g).tolist() for n in (13, 5)]
    return [s.output_ids for s in engine.generate(prompts, GREEDY)], engine


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from conftest import save_hf_checkpoint

    path = tmp_path_factory.mktemp("quant") / "mixtral"
    save_hf_checkpoint(path, "mixtral")
    return path


def test_quantized_store_holds_real_bytes_and_dequantizes_near_bf16(mixtral):
    dense, q = load(mixtral), load(mixtral, quant="int4-g32")
    assert q.store.data.dtype == torch.uint8 and q.store.dtype == dense.store.dtype
    cfg = q.cfg
    assert q.store.expert_bytes == 3 * cfg.expert_intermediate_size * (cfg.hidden_size // 2 + 2 * cfg.hidden_size // 32)
    assert q.store.nbytes == len(cfg.moe_layers) * cfg.num_experts * q.store.expert_bytes
    layer = cfg.moe_layers[1]
    for part in ("gate", "up", "down"):
        a, b = dense.store.part(layer, 3, part), q.store.part(layer, 3, part)
        assert a.shape == b.shape and ((a - b).norm() / a.norm()) < 0.1


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_gives_the_local_tokens_on_int4_experts(mixtral, policy):
    check_policy(mixtral, "int4-g32", policy)


@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_int8_asymmetric_experts_keep_the_local_tokens(mixtral, policy):
    check_policy(mixtral, "int8-asym", policy)


def test_cpu_probes_split_int4_experts_and_keep_the_tokens(mixtral, monkeypatch):
    """Costs claiming a CPU 1000x slower than it is: auto's probes put half of an int4 expert's rows on the CPU
    every other layer planned without it (and nothing more), the rest copied; the tokens stay the local ones."""
    from moeflow.experts import calibration

    monkeypatch.setattr(calibration, "PROBE_GAP", (2, 2))
    want, _ = generate(mixtral, "int4-g32")
    got, engine = generate(mixtral, "int4-g32", {"slots": 5, "policy": "auto"}, costs_table(1e3, 1e-3), True)
    assert got == want
    s = engine.model.experts.stats
    assert s.cpu_probes > 0 and s.cpu_experts == pytest.approx(s.cpu_probes / 2)  # half an expert a probe


def check_policy(mixtral, quant: str, policy: str) -> None:
    want, _ = generate(mixtral, quant)
    ck = load(mixtral)
    slots = len(ck.cfg.moe_layers) * ck.cfg.num_experts if policy == "gpu" else 5
    got, engine = generate(mixtral, quant, {"slots": slots, "policy": policy})
    assert got == want
    s = engine.model.experts.stats
    assert s.lookups > 0 and (policy == "gpu" or s.miss_bytes % load(mixtral, quant=quant).store.expert_bytes == 0)


def test_rows_split_between_cpu_and_copies_keep_the_tokens(mixtral):
    """Equal CPU and copy costs split experts by rows: the CPU dequantizes rows 0:r, the slot gets r:I."""
    want, _ = generate(mixtral, "int4-g32")
    got, engine = generate(mixtral, "int4-g32", {"slots": 4, "policy": "auto"}, costs=costs_table(1.0, 1.0))
    assert got == want
    s = engine.model.experts.stats
    assert 0 < s.bytes_h2d and s.cpu_experts > 0


def test_synthetic_int4_presets_fill_quantized_blocks_and_generate():
    """synthetic:NAME-int4 is NAME with int4 experts: real rows (finite, not all zero) and the dense part alike."""
    ck, dense = load("synthetic:tiny-qwen3-int4"), load("synthetic:tiny-qwen3")
    assert ck.name == "synthetic:tiny-qwen3-int4-g64" and ck.store.fmt.spec == QuantSpec(4, 64)
    assert 3.5 < ck.cfg.expert_numel * 2 / ck.store.expert_bytes < 4  # against bf16
    w = ck.store.part(ck.cfg.moe_layers[0], 1, "down")
    assert torch.isfinite(w).all() and 0.5 < w.std() / dense.store.part(ck.cfg.moe_layers[0], 1, "down").std() < 2
    engine = LLMEngine(ck, max_seqs=1, max_len=32)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].output_ids
    assert len(out) == 3


def test_plan_counts_quantized_bytes(tmp_path, capsys):
    """int4 experts: the same budget holds ~3.8x the slots, so a higher hit rate and a faster decode."""
    from moeflow.cli import main
    from moeflow.perf.profile import reference_profile
    from moeflow.perf.search import search_latency
    from moeflow.checkpoint import read_model_config

    cfg = read_model_config("synthetic:mixtral-8x7b")[1]
    eb = ExpertFormat(cfg.expert_intermediate_size, cfg.hidden_size, torch.bfloat16, QuantSpec(4, 64)).block_bytes
    dense, q = (search_latency(cfg, reference_profile(), 24 << 30, expert_bytes=e) for e in (None, eb))
    assert q.best.budget["expert_bytes"] == eb and 3.5 < dense.best.budget["expert_bytes"] / eb < 4
    assert q.best.budget["slots"] > 3 * dense.best.budget["slots"]
    assert q.best.hit_rate > dense.best.hit_rate and q.best.decode_tps > dense.best.decode_tps
    ref = tmp_path / "ref.json"
    reference_profile().save(ref)
    for argv in (["--model", "synthetic:mixtral-8x7b-int4"], ["--quantize", "int4"]):
        assert main(["plan", "--gpu-memory", "24GiB", "--workload", "latency", "--profile", str(ref), *argv]) == 0
        assert "experts in int4-g64: 0.09 GiB each" in capsys.readouterr().out


def test_quantize_flag_generates_and_names_bad_values(mixtral, capsys):
    from moeflow.cli import main

    argv = ["generate", "--model", str(mixtral), "--prompt", "hi", "--max-new-tokens", "3", "--ignore-eos"]
    assert main(argv + ["--quantize", "int8"]) == 0
    capsys.readouterr()
    assert main(argv + ["--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert "3-bit experts are not supported" in err and "Traceback" not in err


def test_bench_quality_keeps_the_demo_perplexity_within_ten_percent_in_int4(tmp_path, capsys):
    """The shipped demo model on the stand-in held-out text (no corpus here): int8 within 2%, int4 within 10%."""
    import json

    from moeflow.cli import main

    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--context", "64", "--max-tokens", "384", "--out", str(out)]) == 0
    rows = {r["experts"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bfloat16", "int8-g64", "int4-g64"} and "perplexity" in capsys.readouterr().out
    assert abs(rows["int8-g64"]["vs_dense"] - 1) < 0.02 and abs(rows["int4-g64"]["vs_dense"] - 1) < 0.10
    assert rows["int4-g64"]["expert_bytes"] * 3.5 < rows["bfloat16"]["expert_bytes"]


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru", "cpu"])
def test_quantized_experts_offloaded_to_cuda_give_the_all_gpu_tokens(mixtral, policy):
    """fp32 on a GPU: the int4 slots dequantized there and the CPU's share give the all-on-GPU int4 tokens."""
    def tokens(slots=None):
        ck = load(mixtral, device="cuda", dtype="fp32", expert_device="cpu" if slots else None, quant="int4-g32")
        oc = OffloadConfig(tiny_budget(ck, slots), policy) if slots else None
        engine = LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=oc)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 310, (n,), generator=g).tolist() for n in (17, 6)]
        out = [s.output_ids for s in engine.generate(prompts, GREEDY)]
        torch.cuda.set_per_process_memory_fraction(1.0)
        return out, engine

    want, local = tokens()
    assert local.model.experts.store.data.is_cuda
    got, engine = tokens(5)
    assert got == want and engine.model.experts.stats.lookups > 0


def check_int4_kernel(device: str, dtype: torch.dtype) -> None:
    """The Triton int4 expert against the fallback (rows dequantized, dense FFN in x's dtype): within 1% (bf16/fp16
    rounding of the intermediate and accumulation order) for every variant, through the decode GEMVs (n up to
    GEMV_MAX_TOKENS) and the tiled kernels (n beyond)."""
    from moeflow.experts.local import partial_ffn
    from moeflow.quant import triton_int4

    g = torch.Generator().manual_seed(0)
    # (spec, I, H, GEMV programs): the programs aimed at pick the gate_up GEMV's rows a program, 8, 4 and 2 here
    # (and fewer programs keep the interpreter quick). I = 512: the tiled down GEMM splits its rows over two
    # programs; every I gives the down GEMV several programs a column block (atomic adds). H = 192 and 384 are
    # 3 groups: a GEMV step's groups partly masked.
    cases = [(QuantSpec(4, 32), 512, 256, 64), (QuantSpec(4, 64, False), 96, 192, 24),
             (QuantSpec(4, 128, True, torch.float16), 96, 384, 512)]
    if device == "cuda":  # every combination, cheap on a GPU (the interpreter takes seconds a call)
        cases += [(QuantSpec(4, gs, sym, sd), 4096, 512, 512) for gs in (32, 64, 128) for sym in (True, False)
                  for sd in (torch.bfloat16, torch.float16)]
    for spec, inter, hidden, programs in cases:
        fmt = ExpertFormat(inter, hidden, dtype, spec)
        block = torch.empty(fmt.block_numel, dtype=torch.uint8)
        fmt.pack(*(torch.randn(inter, hidden, generator=g) * 0.05 for _ in range(3)), block)
        block = block.to(device)
        for n in (1, 2, triton_int4.GEMV_MAX_TOKENS, triton_int4.GEMV_MAX_TOKENS + 1, 40):
            x = torch.randn(n, hidden, generator=g).to(device, dtype)
            want = partial_ffn(x, *fmt.rows(block, 0, inter, dtype)).float()
            with mock.patch.multiple(triton_int4, GEMV_PROGRAMS=programs, GEMV=True):
                got = triton_int4.int4_ffn(x, block, fmt)
            assert got.shape == (n, hidden) and ((got - want).norm() / want.norm()) < 1e-2, (spec, inter, n)


def int4_blocks(n: int, g: torch.Generator, device: str, dtype: torch.dtype):
    """n random int4 experts (inter 96, hidden 128, groups of 32) packed into blocks [n, block] on device."""
    fmt = ExpertFormat(96, 128, dtype, QuantSpec(4, 32, False))
    blocks = torch.empty(n, fmt.block_numel, dtype=torch.uint8)
    for b in blocks:
        fmt.pack(*(torch.randn(96, 128, generator=g) * 0.05 for _ in range(3)), b)
    return fmt, blocks.to(device)


def check_int4_wave(device: str, dtype: torch.dtype) -> None:
    """wave_gemv against each entry's expert through the fallback, weighted and summed per token: waves laid out
    as experts/waves.py lays them (entries sorted by slot, eager or padded to N * K as a static wave, its pads
    weight 0 in the last slot), slots with one to three entries."""
    import numpy as np

    from moeflow.experts.local import partial_ffn
    from moeflow.experts.waves import _padded_segment
    from moeflow.quant import triton_int4

    g = torch.Generator().manual_seed(1)
    fmt, slots = int4_blocks(5, g, device, dtype)
    # (each token's K slots, the wave's slots, static): slot 1 of the last has three entries, slot 4 pads after one
    for picks, order, static in (([[3, 1]], [1, 3], True), ([[3, 1]], [3], True), ([[0, 2], [4, 0]], [0, 2, 4], False),
                                 ([[1, 0], [4, 1], [1, 2]], [1, 4], True)):
        N, K, W = len(picks), len(picks[0]), len(order)
        x = torch.randn(N, 128, generator=g).to(device, dtype)
        w_host = torch.rand(N * K, generator=g).numpy()
        parts = [[n * K + k for n in range(N) for k in range(K) if picks[n][k] == s] for s in order]
        M = N * K if static else sum(map(len, parts))
        meta = np.zeros(2 * M + 2 * W, dtype=np.int32)
        if static:
            _padded_segment(meta, M, W, np.arange(W), parts, w_host)
        else:
            meta[:M] = [e for p in parts for e in p]
            meta[M:M + W] = np.cumsum([len(p) for p in parts])
            meta[M + W:2 * M + W].view(np.float32)[:] = w_host[meta[:M]]
        meta[2 * M + W:] = order
        want = torch.zeros(N, 128)
        for s, p in zip(order, parts):
            for e in p:
                y = partial_ffn(x[e // K:e // K + 1], *fmt.rows(slots[s], 0, 96, dtype)).float().cpu()
                want[e // K] += float(w_host[e]) * y[0]
        out = torch.zeros(N, 128, device=device)
        most = min(N, M - W + 1)
        with mock.patch.object(triton_int4, "GEMV_PROGRAMS", 16):  # fewer programs: a quicker interpreter
            triton_int4.wave_gemv(out, x, torch.from_numpy(meta).to(device), M, W, K, slots, fmt, most)
        assert ((out.cpu() - want).norm() / want.norm()) < 1e-2, (picks, order, static)


def check_int4_layer_gemv(device: str, dtype: torch.dtype) -> None:
    """All on one device, a decode layer's int4 experts through the wave GEMVs, each routing entry a slot of its
    own (quant/grouped.py gemv_experts), against the batched dequantization's entry_experts."""
    from unittest import mock

    from moeflow.quant import grouped, triton_int4

    g = torch.Generator().manual_seed(4)
    fmt, blocks = int4_blocks(6, g, device, dtype)
    for N, K in ((1, 3), (3, 2)):
        x = torch.randn(N, 128, generator=g).to(device, dtype)
        w, ids = torch.rand(N, 6, generator=g).softmax(-1).topk(K)
        ids[-1, -1] = ids[0, 0]  # two tokens on one expert
        ids, w = ids.to(device), w.to(device)
        want = grouped.entry_experts(x, ids, w, blocks, fmt).float()
        with mock.patch.object(triton_int4, "GEMV_PROGRAMS", 16):
            got = grouped.gemv_experts(x, ids, w, blocks, fmt).float()
        assert got.shape == want.shape and ((got - want).norm() / want.norm()) < 1e-2, (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_layer_gemv_matches_the_batched_dequantization_on_cuda(dtype):
    check_int4_layer_gemv("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_triton_kernel_matches_the_fallback_on_cuda(dtype):
    check_int4_kernel("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_wave_gemv_matches_the_fallback_on_cuda(dtype):
    check_int4_wave("cuda", dtype)


def test_int4_triton_kernel_logic_in_the_interpreter():
    """The same on the CPU through TRITON_INTERPRET=1, where Triton is installed (it is not a dependency)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import moeflow

    # fp16: the interpreter reads bf16 tensors wrongly (a bf16 load of 1.0 is not 1.0), the GPU test covers bf16
    code = ("import torch, test_quant; test_quant.check_int4_kernel('cpu', torch.float16); "
            "test_quant.check_int4_wave('cpu', torch.float16); test_quant.check_int4_layer_gemv('cpu', torch.float16)")
    src = str(Path(moeflow.__file__).parents[1])
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_bench_cpu_experts_quantized_reports_packed_bytes(monkeypatch):
    """--quantize int4: the rows count the packed bytes of K experts a layer (what the CPU reads)."""
    import moeflow.bench.cpu_experts as bc

    monkeypatch.setitem(bc.SHAPES, "tiny", bc.Shape("tiny", 256, 64, 2, 4))
    monkeypatch.setattr(bc, "cpu_read_ceiling", lambda: {"stub": 1e10})
    res = bc.bench_cpu_experts(["tiny"], [1, 4], 2, 1, quant=parse_quant("int4"))
    fmt = ExpertFormat(64, 256, torch.bfloat16, QuantSpec(4, 64))
    names = [r["backend"] for r in res["rows"]]  # the native kernel (where it builds) and PyTorch, on int4 blocks
    assert names[-2:] == ["torch:int4-g64"] * 2 and all(n.endswith(":int4-g64") for n in names)
    for r in res["rows"]:
        assert r["gbps"] == pytest.approx(2 * fmt.block_bytes / (r["ms_layer"] / 1e3) / 1e9)
