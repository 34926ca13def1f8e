"""On a CUDA GPU: the latency regime gives the all-GPU tokens, stays under its budget, and overlaps the CPU,
the copy engine and the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import budget_for, check_grouped_passes, check_slot_waves, mixtral_store

from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.offload import OffloadedExperts
from moeflow.policy import POLICIES, get_policy

pytestmark = pytest.mark.gpu
MAX_LEN = 64


@pytest.fixture(autouse=True)
def whole_gpu_after():
    """An offloaded engine caps the process's GPU memory at its budget; the next test starts uncapped."""
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)


def tokens(path, dtype, offload_slots=None, policy="auto"):
    ck = load(path, device="cuda", dtype=dtype, expert_device="cpu" if offload_slots is not None else None)
    oc = OffloadConfig(budget_for(ck, offload_slots), policy) if offload_slots is not None else None
    engine = LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=oc)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 310, (n,), generator=g).tolist() for n in (17, 6)]
    out = [s.output_ids for s in engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))]
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out, engine


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_give_the_all_gpu_tokens(hf_checkpoint, model_type, policy):
    path, _ = hf_checkpoint(model_type)
    want, _ = tokens(path, "fp32")
    ck = load(path)
    slots = len(ck.cfg.moe_layers) * ck.cfg.num_experts if policy == "gpu" else 5
    got, engine = tokens(path, "fp32", slots, policy)
    assert got == want
    assert engine.model.experts.stats.lookups > 0


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_piecewise_graphs_give_the_eager_tokens(hf_checkpoint, model_type):
    """Offloaded decode replays one CUDA graph per stretch between MoE layers; it gives the eager tokens and
    counts each expert lookup once per step (the capture's warm-up runs no experts)."""
    from moeflow.engine.cuda_graph import PiecewiseDecodeGraph

    path, _ = hf_checkpoint(model_type)
    runs = []
    for graphs in (False, True):
        ck = load(path, device="cuda", dtype="fp32", expert_device="cpu")
        engine = LLMEngine(ck, max_seqs=1, max_len=MAX_LEN, cuda_graphs=graphs,
                           offload=OffloadConfig(budget_for(ck, 5, max_seqs=1), "auto"))
        (seq,) = engine.generate([list(range(5, 22))], SamplingParams(max_new_tokens=16, ignore_eos=True))
        torch.cuda.set_per_process_memory_fraction(1.0)
        runs.append((seq.output_ids, engine.model.experts.stats.lookups, engine.graphs))
    (eager, n_eager, _), (graphed, n_graphed, g) = runs
    assert graphed == eager and n_graphed == n_eager
    assert g and all(isinstance(v, PiecewiseDecodeGraph) for v in g.values())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_wave_graphs_give_the_eager_tokens(hf_checkpoint, model_type, policy):
    """In bf16 the GPU's experts run as grouped GEMMs; decode's small waves replay CUDA graphs captured per
    shape. Two sequences decoding together and then one alone give the tokens of eager waves, bit for bit.
    Fixed costs, no calibration and no guesses copied ahead (those follow the copy engine's measured idle time):
    which rows the CPU computes must not follow the run's timings, since in bf16 its sums round differently."""
    from moeflow.perf.costs import ExpertCosts
    from moeflow.policy import auto

    pts = (1, 4, 16, 64, 256)
    costs = ExpertCosts(pts, tuple(1e-3 * n for n in pts), tuple(1e-6 for _ in pts), 1e-3)
    path, _ = hf_checkpoint(model_type)
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto, "AUTO_PREFETCH", False)
        for graphs in (False, True):
            runs.append(wave_run(path, policy, costs, graphs))
    (eager, none), (graphed, shapes) = runs
    assert graphed == eager
    assert not none and shapes  # the eager run captured nothing; the other one did


def wave_run(path, policy, costs, graphs):
    """Two sequences decoding together, then the longer one alone: their tokens and the wave graphs captured."""
    ck = load(path, device="cuda", dtype="bf16", expert_device="cpu")
    engine = LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, expert_costs=costs,
                       offload=OffloadConfig(budget_for(ck, 5, max_seqs=2), policy))
    backend = engine.model.experts
    backend.calibrate, backend.waves.graphs_on = False, graphs
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for p, n in ((list(range(5, 22)), 6), (list(range(40, 47)), 16))]
    while engine.has_unfinished:
        engine.step()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return [s.output_ids for s in seqs], backend.waves.graphs


def test_peak_gpu_memory_stays_under_the_budget():
    ck = load("synthetic:tiny-mixtral", device="cuda", dtype="bf16", expert_device="cpu")
    budget = budget_for(ck, 6, max_seqs=1)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine = LLMEngine(ck, max_seqs=1, max_len=MAX_LEN, offload=OffloadConfig(budget, "auto"))
    list(engine.stream(list(range(3, 40)), SamplingParams(max_new_tokens=20, ignore_eos=True)))
    peak = torch.cuda.max_memory_allocated() - base + ck.dense_bytes
    torch.cuda.set_per_process_memory_fraction(1.0)
    assert peak <= budget, (peak, budget)
    assert engine.model.experts.stats.bytes_h2d > 0


@torch.inference_mode()
def test_cpu_copy_and_gpu_overlap():
    """One expert on the CPU and one copied take less time together than one after the other."""
    store = mixtral_store(hidden=2048, inter=5632, layers=1, std=0.02, pin=True)
    policy = get_policy("fiddler")  # 1 token -> CPU, 12 tokens -> copied (not cached: copied every call)
    backend = OffloadedExperts(store, torch.device("cuda"), policy, policy.split(4, 1, 8, 2), [(0, 7), (0, 6)])
    A, B, C = 0, 1, 7

    def timed(ids):
        ids = torch.tensor(ids, device="cuda")
        x = torch.randn(ids.shape[0], 2048, device="cuda", dtype=torch.bfloat16)
        w = torch.full(ids.shape, 0.5, device="cuda")
        backend(0, x, ids, w)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            backend(0, x, ids, w)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[2]

    cpu_only = timed([[A, C]])                           # A: 1 token on the CPU, C resident
    copy_only = timed([[B, C]] * 12)                     # B: 12 tokens, copied
    both = timed([[A, B]] + [[B, C]] * 11)
    assert both < 0.85 * (cpu_only + copy_only), (both, cpu_only, copy_only)


@pytest.mark.parametrize("policy", ["auto", "lru", "fiddler"])
def test_grouped_slots_match_the_local_experts_in_bf16(policy):
    """bf16 on the GPU runs the experts in slots by grouped GEMMs (see check_slot_waves)."""
    stats = check_slot_waves("cuda", policy, grouped=None)
    if policy == "auto":
        assert 0 < stats.cpu_experts and 0 < stats.copied_experts


@torch.inference_mode()
def test_cpu_fixed_part_is_timed_with_the_copy_engine_idle(monkeypatch):
    """measure_costs times one expert and m in one call for the CPU call's fixed part with no copy under way
    (a copy beside one expert's call covers all of it, beside m experts' only part); the per-token CPU times
    are taken beside copies."""
    from moeflow.experts.cpu import CpuExperts
    from moeflow.experts.local import block_ffn
    from moeflow.perf import costs as C

    H, I, B = 1024, 2816, 6
    blocks = torch.randn(B, 3 * I * H).to(torch.bfloat16).pin_memory()
    slot, stream, cpu = torch.empty(3 * I * H, dtype=torch.bfloat16, device="cuda"), torch.cuda.Stream(), CpuExperts()
    idle, busy = [], []

    def watch(fn, seen):
        return lambda *a: (seen.append(stream.query()), fn(*a))[1]

    real = C.paired_s
    monkeypatch.setattr(C, "paired_s", lambda a, b, r: real(watch(a, idle), watch(b, idle), r))
    costs = C.measure_costs(lambda i: blocks[i], I, H, B, slot, watch(cpu.expert, busy), block_ffn(I), 3,
                            copy_stream=stream, cpu_many=(2, cpu.many(2, blocks)))
    assert idle and all(idle)               # the fixed part: nothing on the copy stream
    assert not all(busy)                    # the per-token times: copies queued beside the CPU
    assert 0.0 <= costs.cpu_fixed_s <= costs.cpu_s[0] and 0.0 < costs.cpu_alone <= 1.0



@torch.inference_mode()
def test_a_prefill_wave_runs_in_grouped_passes(monkeypatch):
    """A wave of more entries than the step's tokens runs as several grouped passes (see check_grouped_passes)."""
    check_grouped_passes("cuda", monkeypatch)


def test_the_gpu_profile_times_the_models_resident_decode_layer(cache):
    """On a GPU the profile measures the model's decode layer with its experts on the GPU (the engine's own
    steps), and a second model with another attention shape adds its own layer."""
    from dataclasses import replace

    from moeflow.checkpoint import read_model_config
    from moeflow.perf.measure import QUICK, get_profile

    tiny = read_model_config("synthetic:tiny-mixtral")[1]
    p, how = get_profile(tiny, "cuda", sizes=QUICK, progress=False)
    assert how == "measured" and p.has_gpu and p.has_layer(tiny)
    assert 0 < p.resident_layer(tiny) < 0.05  # seconds: one small layer, not a step
    assert 0 < p.probe_s < 0.05  # the host's speed read beside its figures (perf/probe.py)
    other = replace(tiny, num_key_value_heads=2)
    q, how = get_profile(other, "cuda", sizes=QUICK, progress=False)
    assert how == "added shape" and q.has_layer(other) and len(q.resident_layers) == 2
