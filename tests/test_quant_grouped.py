"""Quantized slots in grouped GEMMs (quant/grouped.py, experts/waves.py): the batched dequantization gives the
per-slot values bit for bit, a wave's kernels do not grow with its slots, and the waves (in passes and static,
decode-sized) give the local experts' output and the policies' tokens, here with PyTorch's grouped GEMM on the CPU."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from moeflow.quant import grouped as qgrouped
from moeflow.quant.format import ExpertFormat, QuantSpec, dequantize

SPECS = [QuantSpec(4, 32), QuantSpec(4, 64, False), QuantSpec(8, 64), QuantSpec(8, 32, False, torch.float16),
         QuantSpec(4, 128, True, torch.float16)]


@pytest.fixture(autouse=True)
def grouped_on(monkeypatch):
    """The batched dequantization is off by default (quant/grouped.py ENABLED): these tests run it."""
    monkeypatch.setattr(qgrouped, "ENABLED", True)


def need_grouped_mm() -> None:
    try:
        torch._grouped_mm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16),
                          offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch has no grouped GEMM on the CPU")


def quant_store(spec: QuantSpec = QuantSpec(4, 32), hidden: int = 256, inter: int = 512):
    """A Mixtral-shaped store (2 layers, 8 experts, top-2) of random weights quantized by spec."""
    from conftest import mixtral_store

    from moeflow.experts.store import ExpertStore

    dense = mixtral_store(hidden=hidden, inter=inter, layers=2, std=0.05)
    store = ExpertStore(dense.cfg, torch.bfloat16, "cpu", quant=spec)
    for layer in range(2):
        for e in range(8):
            gate, up, down = (dense.part(layer, e, p) for p in ("gate", "up", "down"))
            store.set_expert(layer, e, gate, up, down)
    return store


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_batched_dequantization_is_the_per_slot_one_bit_for_bit(spec, dtype):
    fmt = ExpertFormat(16, 256, dtype, spec)
    g = torch.Generator().manual_seed(1)
    slots = torch.empty(5, fmt.block_numel, dtype=torch.uint8)
    for s in range(5):
        fmt.pack(*(torch.randn(16, 256, generator=g) * 10 ** (s - 2) for _ in range(3)), slots[s])
    ids = torch.tensor([3, 0, 3, 4])
    gate_up, down_t = qgrouped.dequantize_slots(slots, ids, fmt)
    assert gate_up.shape == (4, 32, 256) and down_t.shape == (4, 16, 256) and gate_up.dtype == dtype
    for i, s in enumerate(ids.tolist()):
        want = dequantize(slots[s].view(3, 16, fmt.record), fmt, dtype)  # [3, I, H]
        assert torch.equal(gate_up[i], want[:2].reshape(32, 256)) and torch.equal(down_t[i], want[2])


def test_passes_are_cut_to_the_slots_one_pass_dequantizes(monkeypatch):
    fmt = ExpertFormat(512, 256, torch.bfloat16, QuantSpec(4, 32))
    monkeypatch.setattr(qgrouped, "DEQUANT_PASS_BYTES", 3 * 3 * 512 * 256 * 2 + 1)
    assert qgrouped.slots_per_pass(fmt) == 3
    assert qgrouped.cut_passes([[0, 1, 2, 3, 4], [5]], 3) == [[0, 1, 2], [3, 4], [5]]
    cuda_like = torch.empty(0, dtype=torch.uint8)  # groupable asks for CUDA: not this tensor
    assert not qgrouped.groupable(cuda_like, fmt, 1)


def grouped_waves(monkeypatch, static: bool) -> list[bool]:
    """Quantized waves forced to run grouped on the CPU (static: decode-sized waves as the graphs run them,
    eagerly); returns, per layer call, whether it ran static."""
    from moeflow.experts import waves as W

    need_grouped_mm()
    monkeypatch.setattr(qgrouped, "groupable", lambda slots, fmt, n: fmt is not None and fmt.quantized)
    statics, begin = [], W.Waves.begin

    def static_begin(self, x, w_host, K):
        if static and not self.static_on:
            self.use_static()
        begin(self, x, w_host, K)
        statics.append(self._layer[4])

    monkeypatch.setattr(W.Waves, "begin", static_begin)
    return statics


@pytest.mark.parametrize("policy, static", [("auto", False), ("lru", True)])
def test_quantized_waves_match_the_local_experts(policy, static, monkeypatch):
    """Copies and residents, split experts (their zeroed gate rows dequantize to 0), slots reused in a layer: the
    grouped quantized waves give LocalExperts' output within bf16 rounding; 40-token waves in passes of at most
    3 slots."""
    from conftest import check_slot_waves

    statics = grouped_waves(monkeypatch, static)
    monkeypatch.setattr(qgrouped, "DEQUANT_PASS_BYTES", 3 * 3 * 128 * 128 * 2)
    check_slot_waves("cpu", policy, True, store=quant_store(hidden=128, inter=128))
    assert any(statics) == static and not all(statics)


@torch.inference_mode()
def test_a_quantized_wave_is_a_fixed_number_of_ops_whatever_its_slots(monkeypatch):
    """Grouped, the ops of a wave do not grow with its slots (one batched dequantization, two grouped GEMMs);
    slot by slot they do."""
    from moeflow.experts.waves import Waves

    need_grouped_mm()
    store = quant_store(hidden=128, inter=64)
    fmt = store.fmt
    slots = store.data[0].clone()  # [8, block]
    x = torch.randn(8, 128, dtype=torch.bfloat16)

    def ops(grouped: bool, n: int) -> int:
        waves = Waves(slots, fmt.inter, graphs=False, fmt=fmt)
        waves.grouped = grouped
        waves.begin(x, torch.full((8 * 2,), 0.5).numpy(), 2)
        wave = {s: ([2 * s, 2 * s + 1], None) for s in range(n)}  # slot s: token s, both its entries
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            waves.run(wave)
        # top-level ops: the CPU's grouped GEMM loops over its groups inside
        return sum(1 for e in prof.events() if e.cpu_parent is None and "empty" not in e.name)

    grouped, each = [ops(True, 2), ops(True, 8)], [ops(False, 2), ops(False, 8)]
    print(f"ops per wave of 2 and 8 slots: grouped {grouped}, slot by slot {each}")
    assert grouped[0] == grouped[1] and each[1] > each[0] > grouped[0]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from conftest import save_hf_checkpoint

    path = tmp_path_factory.mktemp("quant") / "mixtral"
    save_hf_checkpoint(path, "mixtral")
    return path


@pytest.mark.parametrize("policy", ["auto"])  # CPU share, copies, residents; lru: the output tests above
def test_grouped_quantized_waves_keep_the_local_tokens(mixtral, policy, monkeypatch):
    """The tiny int4 Mixtral through grouped quantized waves (decode's static): the policies' greedy tokens are
    the all-local ones."""
    from test_quant import check_policy

    statics = grouped_waves(monkeypatch, static=True)
    check_policy(mixtral, "int4-g32", policy)
    assert any(statics)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_quantized_waves_on_cuda_match_the_local_experts(policy):
    """bf16 int4 slots on the GPU run grouped by default, decode waves replayed as graphs."""
    from conftest import check_slot_waves

    from moeflow.experts import waves as W

    store = quant_store()
    store.pin()
    assert qgrouped.groupable(torch.empty(1, dtype=torch.uint8, device="cuda"), store.fmt, W.GRAPH_MAX_ENTRIES)
    check_slot_waves("cuda", policy, None, store=store)


@torch.inference_mode()
def test_local_experts_dequantize_a_decode_step_in_one_batch(monkeypatch):
    """LocalExperts on a quantized store, decode-sized: each entry's expert dequantized in one op (an expert two
    tokens pick, twice), no host sync; the per-expert path's output within bf16 rounding."""
    from moeflow.experts.ffn import quantized_experts
    from moeflow.experts.local import LocalExperts

    store = quant_store(QuantSpec(4, 64, False))
    monkeypatch.setattr(qgrouped, "groupable", lambda slots, fmt, n: n <= 6)
    local = LocalExperts(store)
    g = torch.Generator().manual_seed(2)
    for n in (1, 3):
        x = torch.randn(n, 256, generator=g).bfloat16()
        ids = torch.tensor([[1, 5], [5, 0], [1, 5]])[:n]
        w = torch.softmax(torch.randn(n, 2, generator=g), -1)
        want = quantized_experts(x, ids, w, store.data[1], store.fmt).float()
        with mock.patch.object(qgrouped, "entry_experts", wraps=qgrouped.entry_experts) as batched:
            got = local(1, x, ids, w).float()
        assert batched.call_count == 1
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def greedy_with_logits(engine, prompt: str, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and, per step, the logits [V] (fp32, host) they were picked from."""
    import moeflow.engine.llm_engine as E
    from moeflow.engine.sequence import SamplingParams

    seen, sample = [], E.sample

    def record(logits, seqs):
        seen.append(logits[0].float().cpu())
        return sample(logits, seqs)

    with mock.patch.object(E, "sample", record):
        ids = engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].output_ids
    return ids, seen


def assert_same_or_near_tie(want, got, tol: float) -> int:
    """Two greedy runs (tokens, per-step logits): where their contexts are equal (up to the first different token)
    the logits agree within tol x the largest reference logit, and a different token is a near-tie: its reference
    logit within twice that step's largest difference of the top one. Random tiny models have many (top-two
    margins of one or two bf16 steps), so any change of rounding may flip one. Returns the steps compared."""
    for i, ((a, la), (b, lb)) in enumerate(zip(zip(*want), zip(*got))):
        diff = (la - lb).abs().max().item()
        assert diff <= tol * la.abs().max().item(), (i, diff)
        if a != b:
            assert la.max().item() - la[b].item() <= 2 * diff, (i, a, b, diff)
            return i + 1
    return len(want[0])


@pytest.mark.gpu
@torch.inference_mode()
def test_fused_int4_experts_decode_in_a_graph_like_the_pytorch_path():
    """A tiny Qwen3 in int4 on the GPU: the fused Triton backend is graph-safe and, decoding under the CUDA graph,
    gives the PyTorch path's logits (10%) and its tokens but at near-ties."""
    from moeflow.checkpoint import load
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.experts.local import LocalExperts

    ck = load("synthetic:tiny-qwen3", device="cuda", dtype="bf16", quant="int4")
    runs = []
    for fused in (False, True):
        ck.model.set_experts(LocalExperts(ck.store, fused=fused))
        assert ck.model.experts.fused == fused and (ck.model.experts.graph_safe or not fused)
        engine = LLMEngine(ck, max_seqs=1, max_len=64)
        runs.append(greedy_with_logits(engine, "Fused experts replay the same tokens", 24))
    steps = assert_same_or_near_tie(*runs, tol=0.1)
    print(f"fused int4: {steps} steps compared, tokens equal: {runs[0][0] == runs[1][0]}")


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("policy", ["lru"])  # auto's CPU share: test_quantized_waves_on_cuda_match_the_local_experts
def test_grouped_int4_waves_decode_like_the_all_gpu_experts(policy):
    """A tiny Qwen3 in int4, bf16: offloaded (grouped quantized waves, decode's replayed as graphs) against all
    experts on the GPU, logits within 10% and tokens but at near-ties."""
    from moeflow.checkpoint import load
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from test_quant import tiny_budget

    runs = []
    for slots in (None, 40):
        ck = load("synthetic:tiny-qwen3", device="cuda", dtype="bf16", quant="int4",
                  expert_device="cpu" if slots else None)
        oc = OffloadConfig(tiny_budget(ck, slots, max_seqs=1), policy) if slots else None
        engine = LLMEngine(ck, max_seqs=1, max_len=64, offload=oc)
        runs.append(greedy_with_logits(engine, "Grouped waves replay the same tokens", 24))
        torch.cuda.set_per_process_memory_fraction(1.0)
    waves = engine.model.experts.waves
    assert waves.grouped and waves.dequantized
    steps = assert_same_or_near_tie(*runs, tol=0.1)
    print(f"grouped int4 waves ({policy}): {steps} steps compared, tokens equal: {runs[0][0] == runs[1][0]}, "
          f"{len(waves.graphs)} wave graphs")


def check_triton_waves(device: str, dtype: torch.dtype, gemv: bool = False) -> None:
    """Waves over int4 slots through the fused Triton kernels (TRITON_WAVES) or, static, through the GEMVs (gemv):
    each entry's expert on its token, weighted and summed (the reference: its rows dequantized, the dense FFN),
    in passes and static (padded)."""
    from unittest import mock

    import numpy as np

    from moeflow.experts.ffn import partial_ffn
    from moeflow.experts.waves import Waves
    from moeflow.quant import triton_int4

    fmt = ExpertFormat(64, 128, dtype, QuantSpec(4, 64))
    g = torch.Generator().manual_seed(4)
    slots = torch.empty(8, fmt.block_numel, dtype=torch.uint8)
    for s in range(8):
        fmt.pack(*(torch.randn(64, 128, generator=g) * 0.05 for _ in range(3)), slots[s])
    slots = slots.to(device)
    x = torch.randn(3, 128, generator=g).to(device, dtype)
    w_host = torch.rand(6, generator=g).numpy().astype(np.float32)
    wave = {1: ([0, 3], None), 4: ([1, 2, 5], None), 6: ([4], None)}  # N = 3 tokens, K = 2
    want = torch.zeros(3, 128, device=device)
    for s, (entries, _) in wave.items():
        for i in entries:
            want[i // 2] += w_host[i] * partial_ffn(x[i // 2:i // 2 + 1], *fmt.rows(slots[s], 0, 64, dtype)).float()[0]
    for static in (False, True):
        waves = Waves(slots, 64, graphs=False, fmt=fmt)
        waves.grouped = waves.triton = not gemv
        waves.gemv = gemv  # GEMVs on decode's static waves; the others slot by slot
        if static:
            waves.use_static()
        waves.begin(x, w_host, 2)
        with mock.patch.object(triton_int4, "wave_gemv", wraps=triton_int4.wave_gemv) as spy:
            waves.run(wave)
        got = waves.result()
        assert waves._layer[4] == static and spy.called == (gemv and static)
        assert ((got - want).norm() / want.norm()) < 2e-2, static


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemv", [False, True])
def test_triton_waves_match_the_dequantized_experts_on_cuda(dtype, gemv):
    check_triton_waves("cuda", dtype, gemv)


def test_triton_waves_logic_in_the_interpreter():
    """The same on the CPU through TRITON_INTERPRET=1 (fp16: the interpreter reads bf16 wrongly), where Triton is
    installed (it is not a dependency)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import moeflow

    code = ("import torch, test_quant_grouped as t; t.check_triton_waves('cpu', torch.float16); "
            "t.check_triton_waves('cpu', torch.float16, gemv=True)")
    path = os.pathsep.join([str(Path(moeflow.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_budget_counts_a_pass_of_dequantized_weights(monkeypatch):
    """What one grouped pass dequantizes is a GPU temporary: counted where quantized waves run dequantized (a
    decode wave's 16 slots fit a pass), nothing where they do not."""
    small = ExpertFormat(768, 2048, torch.bfloat16, QuantSpec(4, 64))    # Qwen3-30B-A3B's expert: 42 slots a pass
    large = ExpertFormat(14336, 4096, torch.bfloat16, QuantSpec(4, 64))  # Mixtral's: one, fewer than a wave's 16
    per_slot = 3 * 768 * 2048 * 2
    assert qgrouped.workspace_bytes(small, 16, 128) == qgrouped.DEQUANT_PASS_BYTES // per_slot * per_slot
    assert qgrouped.workspace_bytes(small, 16, 128) <= qgrouped.DEQUANT_PASS_BYTES
    assert qgrouped.workspace_bytes(small, 16, 20) == 20 * per_slot  # a pass holds one layer's experts at most
    assert qgrouped.workspace_bytes(large, 16, 8) == 0
    monkeypatch.setattr(qgrouped, "ENABLED", False)
    assert qgrouped.workspace_bytes(small, 16, 128) == 0  # off: nothing dequantized
