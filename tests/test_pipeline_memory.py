"""The pipeline's host memory: the KV runs, the plan's host bytes against what the engine holds, the search."""

from __future__ import annotations

import pytest
import torch

from moeflow.checkpoint import load, read_model_config
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.throughput_model import ThroughputPolicy, throughput_memory
from moeflow.perf.profile import reference_profile
from moeflow.pipeline.kv import HostKV
from moeflow.pipeline.load import PipelineSpec, kv_positions, plan_for
from moeflow.pipeline.plan import choose_plan, max_sequences


def test_host_kv_runs_are_first_fit_and_merge_back():
    _, cfg = read_model_config("synthetic:tiny-mixtral")
    kv = HostKV(cfg, 100, torch.float32, max_seqs=8)
    a, b, c = kv.allocate(30), kv.allocate(50), kv.allocate(20)
    assert (a, b, c) == (0, 30, 80) and kv.allocate(1) is None
    kv.release(b)
    assert kv.allocate(60) is None       # 50 free, in one run
    kv.release(a)                        # merged with b's run: 80 free from 0
    assert kv.allocate(60) == 0 and kv.used == 80
    kv.release(0)
    kv.release(c)
    assert kv.free_runs == [(0, 100)] and kv.used == 0
    assert kv.nbytes == HostKV.bytes_for(cfg, 100, 4) == kv[0][0].numel() * 4 * 2 * cfg.num_hidden_layers


@pytest.mark.parametrize("prefault", [False, True])
def test_host_kv_arenas_are_touched_when_made_with_prefault(prefault, monkeypatch):
    """PREFAULT: the arenas' pages are resident once made (the prefill's store thread then writes touched
    memory); without it they stay untouched until written. Arenas of 64 MiB: above glibc's largest mmap
    threshold, so each is a fresh mapping, not reused heap, but for what the process freed just before (in a
    full test run the first arena came back resident): without PREFAULT most, not all, are untouched."""
    import ctypes
    import os

    from moeflow.pipeline import kv as kv_module

    libc, page = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")

    def resident_share(t: torch.Tensor) -> float:
        lo = t.data_ptr() // page * page
        n = -(-(t.data_ptr() + t.numel() * t.element_size() - lo) // page)
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * page), vec) == 0
        return sum(v & 1 for v in bytes(vec)) / n

    monkeypatch.setattr(kv_module, "PREFAULT", prefault)
    _, cfg = read_model_config("synthetic:tiny-mixtral")
    kv = HostKV(cfg, 1 << 17, torch.float32, max_seqs=8)  # K, V of 128K positions x 4 heads x 32: 64 MiB each
    shares = [resident_share(a) for layer in kv.layers for a in layer]
    assert kv.nbytes == 512 << 20
    if prefault:
        assert all(s > 0.99 for s in shares), shares
    else:
        assert sum(s < 0.01 for s in shares) >= 0.75 * len(shares), shares
    assert kv.touch_s >= 0


def test_planned_host_bytes_cover_what_the_engine_holds():
    """A plan's host bytes hold the store and the engine's host KV cache, and that cache admits the whole planned
    batch at once (prompts of the planned length)."""
    from moeflow.pipeline.engine import PipelineEngine

    ck = load("synthetic:tiny-qwen3")
    spec = PipelineSpec("synthetic:tiny-qwen3", "cpu", plan="5,2,0.25,0,cpu", prompt_len=12, gen_len=4, max_len=64)
    pol, pred = plan_for(spec, held=ck.store.nbytes, cfg=ck.cfg)
    engine = PipelineEngine(ck, pol, spec.max_len, kv_positions=kv_positions(spec, pol))
    b = ck.store.data.element_size()
    assert pred.host_bytes >= ck.store.nbytes + engine.cache.nbytes
    assert pred.host_bytes - ck.store.nbytes - engine.cache.nbytes < HostKV.bytes_for(ck.cfg, 16, b) + (8 << 20)
    for _ in range(pol.N + 2):
        engine.add_request(list(range(3, 3 + spec.prompt_len)), SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()  # the prefill round admits all it can
    assert len(engine.running) == pol.N and len(engine.waiting) == 2
    while engine.has_unfinished:
        engine.step()
    assert engine.cache.used == 0
    engine.close()


def test_the_search_takes_the_most_sequences_host_memory_holds():
    """Mixtral at 24 GiB is bound by PCIe: the plan is the largest batch whose KV runs fit beside the experts."""
    _, cfg = read_model_config("synthetic:mixtral-8x7b")
    host = 120 << 30
    n = max_sequences(cfg, host, 172, 128)
    assert throughput_memory(cfg, ThroughputPolicy(n, 1, 0.0, 0.0, False), 172, 128)[1] <= host
    assert throughput_memory(cfg, ThroughputPolicy(n + 1, 1, 0.0, 0.0, False), 172, 128)[1] > host
    best = choose_plan(cfg, reference_profile(), 24 << 30, 172, 128, host=host)
    assert best.policy.N == n and best.host_bytes <= host and best.gpu_bytes <= 24 << 30


@pytest.mark.parametrize("grouped_tokens", [None, 16])
def test_the_plan_counts_the_largest_grouped_call(grouped_tokens, monkeypatch):
    """A step through LayerWeights' grouped calls (recorded, not run), 8 routing entries a token where the
    workspace counts about 4: every call's entries fit what the plan counts for the step (the workspace's share
    plus grouped_call_excess), with calls as large as GROUPED_BYTES allows or of 16 tokens."""
    from moeflow.engine.budget import pass_entries_per_token, pass_entry_bytes
    from moeflow.experts.store import ExpertStore
    from moeflow.models import get_architecture
    from moeflow.perf.throughput_model import grouped_call_excess
    from moeflow.pipeline import weights
    from moeflow.synthetic import PRESETS

    cfg = get_architecture("qwen3_moe").config(PRESETS["tiny-qwen3"] | {"num_experts_per_tok": 8,
                                                                         "moe_intermediate_size": 64})
    I, K = cfg.expert_intermediate_size, cfg.num_experts_per_tok
    if grouped_tokens:
        monkeypatch.setattr(weights, "GROUPED_BYTES", grouped_tokens * 2 * I * K * 2)
    calls = []
    monkeypatch.setattr(weights, "grouped_experts", lambda x, ids, *_: calls.append(ids.numel()) or x.clone())
    lw = weights.LayerWeights(ExpertStore(cfg, torch.bfloat16, "cpu"), torch.device("cpu"), 1.0, grouped=True)
    assert pass_entries_per_token(cfg, 2) < K
    for step in (40, 300):
        calls.clear()
        ids = torch.randint(0, cfg.num_experts, (step, K))
        lw.ffn(0, torch.zeros(step, cfg.hidden_size, dtype=torch.bfloat16), ids, torch.ones(step, K))
        assert sum(calls) == step * K
        counted = pass_entries_per_token(cfg, 2) * step * pass_entry_bytes(cfg, 2) + grouped_call_excess(cfg, step, 2)
        assert max(calls) * pass_entry_bytes(cfg, 2) <= counted, (step, calls)


@pytest.mark.gpu
def test_the_gpu_peak_stays_within_the_plan():
    from moeflow.pipeline.engine import PipelineEngine

    ck = load("synthetic:tiny-mixtral", device="cuda", dtype="bf16", expert_device="cpu")
    ck.store.pin()
    spec = PipelineSpec("synthetic:tiny-mixtral", "cuda", "bf16", 1 << 30, "6,3,0.25,0,cpu", 12, 6, 64)
    pol, pred = plan_for(spec, held=ck.store.nbytes, cfg=ck.cfg)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # the non-expert weights, counted by the plan
    before = torch.cuda.get_per_process_memory_fraction()
    engine = PipelineEngine(ck, pol, spec.max_len, kv_positions=kv_positions(spec, pol), gpu_memory=1 << 30)
    assert torch.cuda.get_per_process_memory_fraction() < before  # the allocator capped at the budget
    engine.generate([list(range(3, 15))] * 8, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.close()
    assert torch.cuda.get_per_process_memory_fraction() == before  # and put back
    assert torch.cuda.max_memory_allocated() - base + ck.cfg.dense_numel * 2 <= pred.gpu_bytes


def test_quantized_experts_are_planned_with_their_own_bytes(monkeypatch):
    """Mixtral's experts in int4 (about 3.7x fewer bytes than bf16): the host holds those bytes, more experts stay
    on the GPU at 24 GiB, and the plan predicts more tokens per second; plan_for takes the bytes from the spec's
    quantization (an -int4 preset)."""
    from moeflow.pipeline import load as pipeline_load
    from moeflow.quant.format import expert_bytes, parse_quant

    _, cfg = read_model_config("synthetic:mixtral-8x7b")
    eb = expert_bytes(cfg.expert_intermediate_size, cfg.hidden_size, parse_quant("int4"))
    pol = ThroughputPolicy(8, 4, 0.0, 0.0, False)
    saved = throughput_memory(cfg, pol, 172, 128)[1] - throughput_memory(cfg, pol, 172, 128, eb=eb)[1]
    assert saved == len(cfg.moe_layers) * cfg.num_experts * (cfg.expert_numel * 2 - eb)
    host, budget = 120 << 30, 24 << 30
    dense = choose_plan(cfg, reference_profile(), budget, 172, 128, host=host)
    q = choose_plan(cfg, reference_profile(), budget, 172, 128, host=host, eb=eb)
    assert q.policy.r_w > 2 * dense.policy.r_w and q.tokens_per_s > dense.tokens_per_s
    assert q.gpu_bytes <= budget and q.host_bytes <= host
    monkeypatch.setattr(pipeline_load, "host_budget", lambda held=0: host)
    spec = PipelineSpec("synthetic:mixtral-8x7b-int4", "cpu", "bf16", budget, prompt_len=172, gen_len=128)
    assert plan_for(spec, profile=reference_profile())[1] == q


@pytest.mark.parametrize("model,grouped", [("tiny-mixtral", True), ("tiny-mixtral-int4", None)])
def test_the_plan_counts_what_layer_weights_hold_on_the_gpu(model, grouped):
    """Resident experts plus two buffers of a whole layer each (grouped GEMMs and the quantized kernels take a
    layer's experts as one tensor, the residents copied in beside the streamed): what the plan's GPU bytes
    count for the expert weights, at the blocks' own bytes."""
    from moeflow.pipeline.weights import LayerWeights

    ck = load(f"synthetic:{model}", dtype="bf16")
    eb = ck.store.expert_bytes if ck.store.fmt.quantized else None
    for r_w in (0.25, 0.5):
        lw = LayerWeights(ck.store, torch.device("cpu"), r_w, grouped=grouped)
        assert lw.whole
        pol = ThroughputPolicy(4, 2, r_w, 0.0, False)
        with_experts = throughput_memory(ck.cfg, pol, 16, 8, 2, eb)[0]
        without = throughput_memory(ck.cfg, ThroughputPolicy(4, 2, 1.0, 0.0, False), 16, 8, 2, eb)[0] - \
            len(ck.cfg.moe_layers) * ck.cfg.num_experts * ck.store.expert_bytes   # r_w = 1: every expert, no buffers
        assert with_experts - without == lw.nbytes
