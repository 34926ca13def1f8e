"""The latency regime on the CPU as both tiers: every policy gives the all-local tokens; budget, eviction,
planner and trace replay behave."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import numpy as np
import torch

from moeflow import MoeflowError
from conftest import budget_for, check_grouped_passes, check_slot_waves, mixtral_store

from moeflow.checkpoint import load
from moeflow.config import OffloadConfig, parse_size
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.offload import BIG_JOB, SlotCache, ZeroedRows
from moeflow.experts.trace import TraceRouting, load_trace
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import POLICIES, get_policy
from moeflow.policy.base import SlotSplit
from moeflow.policy.placement import Placement, even_resident

MAX_LEN, N_NEW = 64, 16
GREEDY = SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


def prompts(seed=0, lengths=(13, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 310, (n,), generator=g).tolist() for n in lengths]


def run(path, offload=None, costs=None, max_seqs=2, calibrate=False, lengths=(13, 5)):
    ck = load(path, device="cpu", expert_device="cpu")
    if offload is not None:
        offload = OffloadConfig(budget_for(ck, offload.pop("slots"), max_seqs), **offload)
    engine = LLMEngine(ck, max_seqs=max_seqs, max_len=MAX_LEN, offload=offload)
    if costs is not None:
        backend = getattr(engine.model.experts, "inner", engine.model.experts)  # under a trace replay
        backend.costs = costs
        backend.calibrate = calibrate  # hand-made costs stay as made
    seqs = engine.generate(prompts(lengths=lengths), GREEDY)
    return [s.output_ids for s in seqs], engine


def costs_table(cpu_per_token: float, copy: float) -> ExpertCosts:
    pts = (1, 4, 16, 64, 256)
    return ExpertCosts(pts, tuple(cpu_per_token * n for n in pts), tuple(1e-5 for _ in pts), copy)


@pytest.fixture(params=["mixtral", "qwen3_moe"])
def ckpt(request, hf_checkpoint):
    return hf_checkpoint(request.param)[0]


def test_routing_entries_group_alike_in_python_and_numpy():
    """A layer's entries by expert: plain lists below BULK_ENTRIES, numpy arrays from there (a prompt), the same
    indices in the same order either way; fp32 ids (a packed transfer) read as ints."""
    from moeflow.experts.offload import BULK_ENTRIES, group_entries

    for n in (1, 7, BULK_ENTRIES // 2, BULK_ENTRIES, 3 * BULK_ENTRIES + 5):
        ids = torch.randint(0, 9, (n, 2))
        want: dict[int, list[int]] = {}
        for i, e in enumerate(ids.flatten().tolist()):
            want.setdefault(e, []).append(i)
        for got in (group_entries(ids), group_entries(ids.float())):
            assert sorted(got) == sorted(want) and all(list(got[e]) == want[e] for e in want)
            assert all(isinstance(v, list) == (2 * n < BULK_ENTRIES) for v in got.values())


@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru"])
def test_long_prompts_take_the_bulk_bookkeeping_and_keep_the_tokens(ckpt, policy, monkeypatch):
    """Prompts whose prefill has more routing entries than BULK_ENTRIES group them with numpy: the CPU's jobs
    and the GPU's waves get arrays, and the tokens stay those of the all-on-one-device run."""
    from moeflow.experts.offload import OffloadedExperts

    kinds = set()
    real = OffloadedExperts._cpu_part
    monkeypatch.setattr(OffloadedExperts, "_cpu_part", lambda self, l, x, w, K, jobs:
                        kinds.add(type(jobs[0][2]).__name__) or real(self, l, x, w, K, jobs))
    want, _ = run(ckpt, lengths=(41, 29))
    got, _ = run(ckpt, {"slots": 4, "policy": policy}, costs=costs_table(1e-7, 1e-3), lengths=(41, 29))
    assert got == want
    assert kinds == (set() if policy == "lru" else {"list", "ndarray"})  # decode's lists, the prompt's arrays


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_gives_the_local_tokens(ckpt, policy):
    want, _ = run(ckpt)
    ck = load(ckpt)
    slots = len(ck.cfg.moe_layers) * ck.cfg.num_experts if policy == "gpu" else 5
    got, engine = run(ckpt, {"slots": slots, "policy": policy})
    assert got == want
    stats = engine.model.experts.stats
    assert stats.lookups > 0
    if policy == "gpu":
        assert stats.hit_rate == 1.0
    if policy == "cpu":
        assert stats.hits == 0 and stats.bytes_h2d == 0 and stats.cpu_experts > 0
    if policy == "lru":
        assert stats.cpu_experts == 0 and stats.copied_experts > 0


@pytest.mark.parametrize("cpu_per_token,copy", [(1.0, 1.0), (1.0, 2.5), (1e-3, 1.0), (1.0, 1e-3)])
def test_auto_splits_and_hand_made_costs_keep_the_tokens(ckpt, cpu_per_token, copy):
    """Equal costs force experts to be split by rows between CPU and copy: the sum must be exact."""
    want, _ = run(ckpt)
    got, engine = run(ckpt, {"slots": 4, "policy": "auto"}, costs=costs_table(cpu_per_token, copy))
    assert got == want
    s = engine.model.experts.stats
    if cpu_per_token == copy:
        assert 0 < s.cpu_experts and 0 < s.copied_experts


def test_auto_corrects_its_cpu_costs_by_what_it_observes(ckpt):
    """Costs that claim a CPU 1000x faster than this one: the observed CPU time scales them up (to the clamp),
    and the tokens do not change."""
    want, _ = run(ckpt)
    got, engine = run(ckpt, {"slots": 4, "policy": "auto"}, costs=costs_table(1e-9, 1.0), calibrate=True)
    assert got == want
    backend = engine.model.experts
    assert backend.stats.cpu_experts > 0 and backend.cpu_scale > 3.0
    # decode's correction is its own: CPU work of 16+ tokens per expert (prefill, AMX) has another
    backend.cpu_scales = [1.0, 1.0]
    x = torch.randn(2 * BIG_JOB, backend.hidden, dtype=backend.host.data.dtype)
    w = torch.full((4 * BIG_JOB,), 0.5)
    def cpu_part(jobs):
        call = backend._cpu_part(0, x, w, 2, jobs)
        call.result()
        assert call.busy_s > 0
        backend._cpu_done(call, jobs, beside_copies=False)

    cpu_part([(0, backend.inter, [0])])                                                      # 1 token
    assert backend.cpu_scales[0] > 1.0 and backend.cpu_scales[1] == 1.0
    cpu_part([(1, backend.inter, list(range(0, 2 * BIG_JOB, 2)))])                          # 16 tokens
    assert backend.cpu_scales[1] > 1.0


def test_a_cpu_estimate_that_idles_the_cpu_is_probed_and_corrected(ckpt, monkeypatch):
    """Costs that claim a CPU 1000x slower than it is keep auto's plans off the CPU, so no layer observes it;
    probes (half a miss on the CPU every few such layers) correct the estimate, and the tokens do not change."""
    from moeflow.experts import calibration

    monkeypatch.setattr(calibration, "PROBE_GAP", (2, 2))
    want, _ = run(ckpt)
    got, engine = run(ckpt, {"slots": 4, "policy": "auto"}, costs=costs_table(1e3, 1e-3), calibrate=True)
    assert got == want
    backend = engine.model.experts
    assert backend.stats.cpu_probes > 0 and backend.stats.cpu_experts > 0
    assert backend.cpu_scale < 0.5
    monkeypatch.setattr(calibration, "PROBE_GAP", (10**9, 10**9))
    _, engine = run(ckpt, {"slots": 4, "policy": "auto"}, costs=costs_table(1e3, 1e-3), calibrate=True)
    assert engine.model.experts.stats.cpu_probes == 0 and engine.model.experts.cpu_scale == 1.0


def test_probes_back_off_while_they_agree_with_the_estimate():
    """A probe that agrees with the corrected estimate doubles the gap to the next (up to the longest); one that
    does not, or a layer whose plan used the CPU, resets it; prompt-sized layers are never probed."""
    from moeflow.experts import calibration

    costs = ExpertCosts((1, 16), (1e-3, 1e-2), (1e-4, 1e-4), 1.0)
    corr = calibration.CostCorrection(inter=8)
    first, longest = calibration.PROBE_GAP

    def gap() -> int:  # decode layers planned without the CPU until the next probe
        n = 1
        while not corr.probe_due(1):
            n += 1
        return n

    def observe(busy_s, probe=True):
        corr.observe_cpu(costs, [(0, 8, [0])], busy_s, beside_copies=False, probe=probe)

    assert not corr.probe_due(BIG_JOB)
    assert gap() == first
    observe(1e-3 * corr.cpu_scales[0])  # agrees
    assert gap() == 2 * first
    observe(1e-3 * corr.cpu_scales[0])
    assert gap() == 4 * first
    observe(1e-2)  # 10x slower than estimated
    assert gap() == first and corr.cpu_scales[0] > 1.0
    for _ in range(20):
        observe(1e-3 * corr.cpu_scales[0])
    assert gap() == longest
    observe(1e-3 * corr.cpu_scales[0], probe=False)  # a plan's own CPU share
    assert gap() == first


def test_the_native_kernel_takes_the_cpu_share_on_its_own_thread(hf_checkpoint):
    """bf16 experts go to the native kernel, handed over to its own thread (no Python thread, so no wait for
    the GIL): the layer's output is the PyTorch path's, and the kernel's time is counted."""
    ck = load(hf_checkpoint("mixtral")[0], device="cpu", dtype="bfloat16", expert_device="cpu")
    engine = LLMEngine(ck, max_seqs=1, max_len=MAX_LEN, offload=OffloadConfig(budget_for(ck, 2, 1), "cpu"))
    backend = engine.model.experts
    if not backend.cpu.uses_native(backend.host.data):
        pytest.skip("no native CPU kernel on this machine")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, ck.cfg.hidden_size, generator=g).bfloat16()
    E = ck.cfg.num_experts
    ids = torch.tensor([[0, 3], [3, E - 1], [E - 2, 0]])
    w = torch.rand(3, 2, generator=g)
    layer = ck.cfg.moe_layers[0]
    with torch.inference_mode():
        got = backend(layer, x, ids, w).float()
        assert backend.stats.cpu_kernel_s > 0 and backend.stats.cpu_s > 0
        backend.cpu.kernel = "torch"
        want = backend(layer, x, ids, w).float()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    backend.close()


def test_auto_measures_costs_on_this_machine(ckpt):
    _, engine = run(ckpt, {"slots": 4, "policy": "auto"})
    c = engine.model.experts.costs
    assert all(t > 0 for t in c.cpu_s + c.gpu_s) and c.copy_s > 0 and c.cpu_call_s > 0


def test_trace_replay_gives_the_same_tokens_for_every_policy(ckpt, tmp_path):
    ck = load(ckpt)
    L, E, K = len(ck.cfg.moe_layers), ck.cfg.num_experts, ck.cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(40 * L)]).view(40, L, K)
    f = tmp_path / "trace.npz"
    import numpy as np
    np.savez(f, experts=ids.numpy().astype(np.uint8), offsets=np.array([0, 40]))
    outs = {p: run(ckpt, {"slots": 4, "policy": p, "routing_trace": str(f)})[0] for p in ("auto", "cpu", "lru")}
    assert outs["auto"] == outs["cpu"] == outs["lru"]


def test_trace_replay_feeds_the_recorded_experts(tmp_path):
    lines = [{"dataset": "d", "problem_id": 0, "token_idx": t, "layer": layer, "experts": [t % 4, (t + 1) % 4],
              "gating_probs": [0.75, 0.25]} for t in range(5) for layer in range(2)]
    lines.append({"dataset": "d", "problem_id": 0, "token_idx": 5, "layer": 0, "experts": [0, 1],
                  "gating_probs": [0.5, 0.5]})  # incomplete token: dropped
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    trace = load_trace(f)
    assert trace.shape == (5, 2, 2)
    seen = []
    cfg = type("C", (), {"moe_layers": [0, 1], "num_experts_per_tok": 2, "num_experts": 4})()
    router = TraceRouting(lambda layer, x, i, w: seen.append((layer, i.tolist(), w.tolist())), trace, cfg)
    x = torch.zeros(3, 8)
    router(1, x, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    router(1, x[:1], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert seen[0][1] == [[0, 1], [1, 2], [2, 3]] and seen[0][2][0] == [0.75, 0.25]
    assert seen[1][1] == [[3, 0]]  # the cursor moved on by 3
    router(1, x, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))  # rows 4, 0, 1: round the end
    assert seen[2][1] == [[0, 1], [0, 1], [1, 2]] and seen[2][2][1] == [0.75, 0.25]
    router(0, x[:1], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))  # each layer its own cursor
    assert seen[3][0] == 0 and seen[3][1] == [[0, 1]]


@pytest.mark.skipif(not (DATA / "mixtral-8x7b-instruct.humaneval.jsonl").exists(),
                    reason="needs ../shared/data/traces (the whole real Mixtral trace; tests/data ships a cut)")
def test_real_mixtral_trace_loads():
    trace = load_trace(DATA / "mixtral-8x7b-instruct.humaneval.jsonl")
    T, L, K = trace.shape
    assert (L, K) == (32, 2) and T > 300 and int(trace.ids.max()) == 7
    reuse = (trace.ids[1:, :, :, None] == trace.ids[:-1, :, None, :]).any(-1).float().mean()
    assert 0.3 < float(reuse) < 0.5  # the README's 40%


def test_trace_for_another_model_is_refused(ckpt, tmp_path):
    import numpy as np
    f = tmp_path / "trace.npz"
    np.savez(f, experts=np.zeros((4, 26, 6), np.uint8))
    with pytest.raises(MoeflowError, match="26 MoE layers, top-6"):
        run(ckpt, {"slots": 4, "routing_trace": str(f)})


def test_budget_holds_at_most_its_slots(ckpt):
    for slots in (3, 7):
        _, engine = run(ckpt, {"slots": slots, "policy": "auto"})
        backend = engine.model.experts
        assert backend.slots.shape[0] == slots
        assert len(backend.cache.where) <= slots
        assert engine.budget["slots"] == slots


def test_budget_too_small_names_the_numbers(ckpt):
    ck = load(ckpt)
    with pytest.raises(MoeflowError, match=r"too small .* non-expert weights .* need at least"):
        LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=OffloadConfig(budget_for(ck, 1), policy="auto"))
    ck = load(ckpt)
    with pytest.raises(MoeflowError, match="policy gpu"):
        LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=OffloadConfig(budget_for(ck, 5), policy="gpu"))
    # the context's KV cache and workspace are what does not fit: the error says which flags shrink them
    ck = load(ckpt)
    with pytest.raises(MoeflowError, match=r"sized for 8 sequence\(s\) of 256 tokens: a shorter context"):
        LLMEngine(ck, max_seqs=8, max_len=4 * MAX_LEN, offload=OffloadConfig(budget_for(ck, 5), policy="auto"))


def test_lru_needs_a_slot_per_layer(ckpt):
    """lru's cache is per layer: fewer slots than MoE layers is a clear error, not a layer with nowhere to copy."""
    ck = load(ckpt)
    L = len(ck.cfg.moe_layers)
    with pytest.raises(MoeflowError, match=rf"policy lru: .* {L} expert slot\(s\)"):
        LLMEngine(ck, max_seqs=2, max_len=MAX_LEN, offload=OffloadConfig(budget_for(ck, L - 1), policy="lru"))
    got, _ = run(ckpt, {"slots": L, "policy": "lru"})
    assert got == run(ckpt)[0]


def test_placement_keeps_the_most_used_and_refuses_another_model(ckpt, tmp_path):
    ck = load(ckpt)
    L, E = len(ck.cfg.moe_layers), ck.cfg.num_experts
    counts = torch.zeros(L, E, dtype=torch.float64)
    counts[1, 3], counts[0, 5], counts[2, 0] = 9, 7, 5
    f = tmp_path / "placement.json"
    Placement("x", counts).save(f)
    # fiddler keeps top_k scratch slots; the two others hold the two most used experts
    _, engine = run(ckpt, {"slots": ck.cfg.num_experts_per_tok + 2, "policy": "fiddler", "placement": str(f)})
    assert engine.model.experts.cache.resident == {(1, 3), (0, 5)}
    Placement("other", torch.zeros(L + 1, E)).save(f)
    with pytest.raises(MoeflowError, match="placement file is for other"):
        run(ckpt, {"slots": 4, "placement": str(f)})


def test_lru_eviction_order_and_protection():
    cache = SlotCache([], SlotSplit(resident=0, cache=2), layers=1)
    a, b, c = (0, 1), (0, 2), (0, 3)
    sa, sb = cache.take(a, set(), keep=True), cache.take(b, set(), keep=True)
    assert cache.lookup(a) == sa          # a is now the most recent
    assert cache.take(c, set(), keep=True) == sb and cache.lookup(b) is None
    assert cache.take(b, protect={a}, keep=True) == cache.where[b] and cache.lookup(c) is None
    per_layer = SlotCache([], SlotSplit(resident=0, cache=4, per_layer=True), layers=2)
    assert per_layer.capacity(0) == per_layer.capacity(1) == 2


def test_lru_evicts_the_least_recent_of_the_group_outside_protect():
    from moeflow.policy.eviction import LRU

    lru = LRU()
    a, b, c, d = (0, 0), (0, 1), (1, 0), (1, 1)
    for k in (a, c, b, d):
        lru.touch(k)
    lru.touch(a)                                  # order now c, b, d, a
    assert lru.victim({a, b, c, d}, set()) == c
    assert lru.victim({a, b, d}, set()) == b      # c is not in this group
    assert lru.victim({a, b, d}, {b}) == d        # b protected: the next
    assert lru.victim({a, b}, {a, b}) == b        # all protected: the least recent anyway
    assert lru.victim({(2, 0)}, set()) is None    # nothing of the group is known
    lru.remove(c)
    assert lru.victim({a: 0, b: 0, c: 0, d: 0}.keys(), set()) == b  # a dict's keys, as SlotCache passes


def test_decayed_use_keeps_the_popular_and_follows_reuse():
    from moeflow.policy.eviction import DecayedUse

    d = DecayedUse(half_life=4)
    popular, rare, new = (0, 0), (0, 1), (0, 2)
    d.seed(popular, 0.9)
    d.seed(rare, 0.05)
    d.hold(popular)
    d.hold(rare)
    assert d.victim({popular, rare}, set()) == rare
    assert d.victim({popular, rare}, {rare}) == popular     # protected: the other one
    assert d.victim({popular}, {popular}) == popular          # all protected: one anyway
    d.touch(new)
    assert d.admits(new, rare) and not d.admits(new, popular)  # one use beats the rare one only
    for _ in range(40):                                        # popular unused for ten half-lives,
        d.tick()                                               # new used every step
        d.touch(new)
    assert d.admits(new, popular)
    for _ in range(3000):  # stale heap entries are dropped: the heap stays small and the order right
        d.touch(rare)
    assert len(d.heap) <= 4 * len(d.held) + 1025 and d.victim({popular, rare}, set()) == popular


def test_adaptive_slots_replace_the_least_used_resident():
    a, b, c = (0, 0), (0, 1), (1, 0)
    cache = SlotCache([a, b], SlotSplit(resident=2, cache=1, adaptive=True), layers=2, eviction="decay",
                      prior={a: 0.9, b: 0.01})
    # a broad step (a prompt: every expert can be selected) neither counts uses nor keeps copies
    cache.begin(0, broad=True)
    assert cache.lookup(c) is None and cache.eviction.score(c) == 0
    assert cache.take(c, protect={a}, keep=True) == 2 and cache.lookup(b) == 1
    cache.begin(0, broad=False)
    assert cache.lookup(c) is None
    # c, used once, is worth more than b (seeded rare: 0.24 uses in its window): the planner hears that a whole
    # copy of c would be kept (keepers), unless every held expert is in use in this layer; and it takes b's slot
    assert cache.keepers([c], protect={a}) == {c} and cache.keepers([c], protect={a, b}) == set()
    assert cache.keepers([a], protect=set()) == set()  # held already
    assert cache.take(c, protect={a}, keep=True) == 1 and cache.lookup(c) == 1 and cache.lookup(b) is None
    # b now scores below c and a: its copy goes to the scratch slot and is not kept
    assert cache.take(b, protect=set(), keep=True) == 2 and cache.lookup(b) is None
    # a split expert (keep=False) never takes a held slot
    assert cache.take((1, 5), protect=set(), keep=False) == 2


def test_auto_adapts_its_residents_and_keeps_the_tokens(hf_checkpoint):
    """Qwen3-MoE (top-4 of 16): whole copies happen, some replace residents; tokens as all-local."""
    path = hf_checkpoint("qwen3_moe")[0]
    want, _ = run(path)
    got, engine = run(path, {"slots": 6, "policy": "auto"}, costs=costs_table(1.0, 1e-3))
    backend = engine.model.experts
    assert got == want and backend.split.adaptive
    start = set(even_resident(backend.split.resident, len(backend.host.layers), backend.E))
    assert set(backend.cache.where) != start and len(backend.cache.where) == backend.split.resident


def test_planner_choices_on_hand_made_costs():
    auto, fiddler, I = get_policy("auto"), get_policy("fiddler"), 1024
    slow_copy = costs_table(cpu_per_token=1e-3, copy=10e-3)  # one token: CPU 1 ms, copy 10 ms
    # One token: the CPU takes most rows, and the copy engine the rest, so both end together (1 ms vs 10).
    assert 0.85 * I <= auto.plan({3: 1}, slow_copy, I, 8)[3] < I
    assert auto.plan({3: 256}, slow_copy, I, 8)[3] <= 0.05 * I               # many tokens: mostly copied
    assert auto.plan({3: 256}, costs_table(1.0, 1e-3), I, 8) == {3: 0}        # copying nearly free: all copied
    rows = auto.plan({1: 1, 2: 1, 3: 200}, slow_copy, I, 8)
    assert rows[1] == rows[2] == I and rows[3] < I                           # few on CPU, the big one copied
    near = costs_table(cpu_per_token=6.5e-3, copy=6.8e-3)
    # Two misses, one per path: whole experts (the copy can stay cached) cost 2% more than a split; one miss:
    # a split halves the layer, so it stays split.
    assert sorted(auto.plan({0: 1, 1: 1}, near, I, 8).values()) == [0, I]
    assert 0 < auto.plan({0: 1}, near, I, 8)[0] < I
    assert 0 < auto.plan({0: 1, 1: 1}, costs_table(cpu_per_token=3e-3, copy=6.8e-3), I, 8)[1] < I
    # more copies than cache slots: still copied (the backend reuses a slot once its expert is computed)
    assert all(r < I / 4 for r in auto.plan({0: 300, 1: 300}, slow_copy, I, max_copies=1).values())
    assert fiddler.plan({0: 3, 1: 40}, slow_copy, I, 8) == {0: I, 1: 0}        # the published threshold
    # Small experts (Qwen3's): a CPU call costs 1 ms of fixed part and 0.2 ms per expert, a copy 0.4 ms. One
    # miss is copied whole (no sliver of it pays the whole call); with twelve, the CPU takes about 6.4 of them,
    # the call's part paid once (1 + 0.2 x = 0.41 (12 - x)): both paths end within 0.4 ms of each other.
    small = replace(costs_table(cpu_per_token=1.2e-3, copy=0.4e-3), cpu_fixed_s=1.0e-3)
    assert auto.plan({0: 1}, small, I, 8) == {0: 0}
    rows = auto.plan({e: 1 for e in range(12)}, small, I, 8)
    on_cpu = sum(r / I for r in rows.values())
    cpu_s, copy_s = 1.0e-3 + 0.2e-3 * on_cpu, (12 - on_cpu) * (0.4e-3 + 1e-5)
    assert 5 <= on_cpu <= 8 and abs(cpu_s - copy_s) <= 0.4e-3, (rows, cpu_s, copy_s)

    # Qwen3's lone decode miss (CPU call 0.32 ms + 0.24, copy 0.40 + GPU): split, it ends ~14% sooner than a
    # whole copy; an expert the cache would keep is copied whole, so its next use hits.
    qwen = replace(costs_table(cpu_per_token=0.56e-3, copy=0.40e-3), cpu_fixed_s=0.32e-3)
    assert 0 < auto.plan({0: 1}, qwen, I, 8)[0] < I
    assert auto.plan({0: 1}, qwen, I, 8, keep={0}) == {0: 0} and 0 < auto.plan({0: 1}, qwen, I, 8, keep={1})[0]


def test_auto_keeps_a_recurring_split_miss(hf_checkpoint, tmp_path, monkeypatch):
    """Qwen3-like costs split a lone miss, and a split copy is never kept. A trace that picks experts 0, 1 and 5
    at every token and layer (residents 0-2): copied whole where the cache would keep it, expert 5 takes unused
    expert 2's slot and hits from then on; the tokens stay the same."""
    import numpy as np

    import moeflow.policy.auto as auto_mod

    monkeypatch.setattr(auto_mod, "AUTO_PREFETCH", False)  # the keep rule alone: guesses copied ahead also hit
    path = hf_checkpoint("qwen3_moe")[0]
    ck = load(path)
    L, K = len(ck.cfg.moe_layers), ck.cfg.num_experts_per_tok
    f = tmp_path / "trace.npz"
    np.savez(f, experts=np.tile(np.array([0, 1, 5][:K], np.uint8), (64, L, 1)), offsets=np.array([0, 64]))
    qwen = replace(costs_table(cpu_per_token=0.56e-3, copy=0.40e-3), cpu_fixed_s=0.32e-3)
    oc = {"slots": 4 * L, "policy": "auto", "routing_trace": str(f)}  # resident experts 0-2 of each layer
    want, _ = run(path, dict(oc, policy="cpu"), max_seqs=1)
    rates = {}
    for slack in (auto_mod.WHOLE_SLACK, auto_mod.KEEP_SLACK):
        monkeypatch.setattr(auto_mod, "KEEP_SLACK", slack)
        got, engine = run(path, dict(oc), costs=qwen, max_seqs=1)
        assert got == want
        rates[slack] = engine.model.experts.inner.stats.hit_rate
    assert rates[auto_mod.WHOLE_SLACK] < 0.7 < 0.9 < rates[auto_mod.KEEP_SLACK], rates


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("24GB") == 24 * 10**9 and parse_size("512M") == 2**29
    with pytest.raises(MoeflowError, match="cannot read the size"):
        parse_size("lots")


@pytest.mark.parametrize("max_groups", [None, 3])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("policy", ["auto", "lru", "fiddler"])
def test_slot_waves_match_the_local_experts_in_bf16(policy, grouped, max_groups, monkeypatch):
    """The GPU's share of a layer run in waves over the slots, here with the CPU as the fast device: grouped
    GEMMs (forced on, where this PyTorch has them on the CPU) or slot by slot; with max_groups, the slots go in
    chunks of that many (a grouped GEMM takes at most 1024 groups), a wave in one pass per chunk."""
    if max_groups:
        from moeflow.experts import waves

        monkeypatch.setattr(waves, "MAX_GROUPS", max_groups)
    if grouped:
        try:
            torch._grouped_mm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16),
                              offs=torch.tensor([2], dtype=torch.int32))
        except (AttributeError, RuntimeError, NotImplementedError):
            pytest.skip("this PyTorch has no grouped GEMM on the CPU")
    stats = check_slot_waves("cpu", policy, grouped)
    if policy == "auto":
        assert 0 < stats.cpu_experts and 0 < stats.copied_experts


def test_a_prefill_wave_runs_in_grouped_passes(monkeypatch):
    """A wave of more entries than the step's tokens runs as several grouped passes (see check_grouped_passes),
    here with PyTorch's grouped GEMM on the CPU."""
    try:
        torch._grouped_mm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16),
                          offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch has no grouped GEMM on the CPU")
    check_grouped_passes("cpu", monkeypatch)


def test_bench_latency_decodes_each_prompt_and_reports_the_median(tmp_path, monkeypatch, capsys):
    """`moeflow bench latency` with the CPU as both tiers: --runs decodes that many prompts per row, in turn; the
    row's decode_tps is their median, and one row that fails is recorded while the others run."""
    import json
    import statistics

    import moeflow.bench.latency as bench
    from moeflow.cli import main

    # the 1 GiB bandwidth measurements are not what this test is about
    monkeypatch.setattr(bench, "ceilings", lambda device: {"cpu_read_bw": 1e10, "h2d_bw": 1e10, "gpu_bw": 1e10})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a short one\nthe second prompt is a little longer\nthird\n")
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--model", "synthetic:tiny-mixtral", "--device", "cpu", "--budgets", "0.4GiB",
                 "--policies", "auto,lru,nonesuch", "--new-tokens", "4", "--ttft-len", "24", "--runs", "3",
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["runs"] == 3 and len(set(d["prompt_tokens"])) == 3
    ok = [r for r in d["rows"] if "error" not in r]
    assert [r["policy"] for r in ok] == ["auto", "lru"]
    for r in ok:
        assert len(r["decode_tps_runs"]) == 3 and r["decode_tps"] == statistics.median(r["decode_tps_runs"])
        assert r["hit_rate"] > 0 and r["fraction_of_bound"] > 0
        ms = r["ms_per_token"]
        assert 0 <= ms["cpu_kernel"] <= ms["cpu"] <= ms["backend"] <= ms["step"]  # nested timers
        pre = r["prefill"]  # the TTFT prompt's breakdown (a prefill's mean): its backend time within the TTFT
        runs = pre["ttft_runs_s"]  # the TTFT: the median of a few prefills of the prompt
        assert len(runs) == bench.TTFT_RUNS and r["ttft_s"] == statistics.median(runs)
        assert pre["ms"]["ttft"] == pytest.approx(r["ttft_s"] * 1e3)
        assert 0 < pre["ms"]["backend"] <= max(runs) * 1e3 and pre["hit_rate"] >= 0
        assert r["policy"] != "lru" or (pre["cpu_experts"] == 0 and pre["copied_experts"] > 0)
        assert r["cpu_probes"] >= 0 and (r["policy"] != "lru" or r["cpu_probes"] == 0)  # lru leaves the CPU idle
        shape = pre["tokens_per_expert"]  # the prompt's 24 tokens x 2 experts over 8, the most used first
        assert len(shape) == 8 and shape == sorted(shape, reverse=True) and sum(shape) == pytest.approx(48, abs=0.1)
    (bad,) = [r for r in d["rows"] if "error" in r]
    assert bad["policy"] == "nonesuch" and "nonesuch" in bad["error"]


@pytest.mark.parametrize("policy", ["auto", "lru", "fiddler"])
def test_a_packed_call_matches_the_plain_one(policy):
    """A decode graph hands the backend its inputs packed (OffloadedExperts.pack: activations where the policy
    may use the CPU, routing weights, expert ids as fp32) and its static output to write into: the same
    outputs and the same plan as the plain call, layer after layer."""
    from moeflow.experts.offload import OffloadedExperts

    store = mixtral_store(hidden=256, inter=512, layers=2, std=0.05)
    pol = get_policy(policy)
    pts = (1, 4, 16, 64, 256)
    even = ExpertCosts(pts, tuple(1e-3 * n for n in pts), tuple(1e-6 for _ in pts), 1e-3)
    split = pol.split(4, 2, 8, 2)
    resident = [(0, 7), (1, 6), (0, 5), (1, 4)][:split.resident]
    plain, packed = (OffloadedExperts(store, torch.device("cpu"), pol, split, resident, costs=even) for _ in range(2))
    plain.calibrate = packed.calibrate = False
    g = torch.Generator().manual_seed(4)
    for step in range(12):
        n = 1 if step % 3 else 3
        x = torch.randn(n, 256, dtype=torch.bfloat16, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)])
        w = torch.softmax(torch.randn(n, 2, generator=g), -1)
        p = packed.pack(x, ids, w)
        assert p.dtype == torch.float32 and p.numel() == (n * 256 if pol.uses_cpu else 0) + 2 * n * 2
        dest = torch.full((n, 256), float("nan"), dtype=torch.bfloat16)  # the graph's static output
        assert packed(step % 2, x, ids, w, p, dest) is dest
        torch.testing.assert_close(dest, plain(step % 2, x, ids, w), rtol=0, atol=0)
    assert packed.stats.cpu_experts == plain.stats.cpu_experts and packed.stats.hits == plain.stats.hits
    assert (packed.stats.cpu_experts > 0) == (policy != "lru")
    plain.close(), packed.close()


def test_bench_latency_repeats_every_row_in_turn(tmp_path, monkeypatch, capsys):
    """--repeat 2 runs all rows, then all of them again (a slow spell of the host falls on one repetition of each);
    with --profile each row carries the model's prediction from it, at the host's speed the row's probes read
    against the profile's readings and at the profile's own, and model-accuracy compares the medians
    of each configuration's rows. --repeat 0 is refused with a message."""
    import json

    import moeflow.bench.latency as bench
    from moeflow.cli import main
    from moeflow.perf.profile import reference_profile

    monkeypatch.setattr(bench, "ceilings", lambda device: {"cpu_read_bw": 1e10, "h2d_bw": 1e10, "gpu_bw": 1e10})
    prof, out = tmp_path / "profile.json", tmp_path / "r.json"
    replace(reference_profile(), probe_s=1e-9).save(prof)  # a host far faster than this one
    args = ["bench", "latency", "--model", "synthetic:tiny-mixtral", "--device", "cpu", "--budgets", "0.4GiB",
            "--new-tokens", "3", "--ttft-len", "16", "--profile", str(prof), "--out", str(out)]
    assert main(args + ["--policies", "lru,nonesuch", "--repeat", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["repeat"]) for r in rows] == [("lru", 0), ("nonesuch", 0), ("lru", 1), ("nonesuch", 1)]
    assert all(r["predicted_decode_tps"] > 0 and r["predicted_ttft_s"] > 0 for r in rows if "error" not in r)
    # the host's speed read beside each row's prefills and decodes: predicted at it, and at the profile's
    for r in (r for r in rows if "error" not in r):
        assert all(r["probes"][k] > 0 and r["host_speed"][k] > 1 for k in ("ttft", "decode"))
        assert r["predicted_decode_tps"] < r["predicted_decode_tps_at_profile_speed"]
        assert r["predicted_ttft_s"] > r["predicted_ttft_s_at_profile_speed"]
    capsys.readouterr()
    assert main(["bench", "model-accuracy", "--results", str(out), "--out", str(tmp_path / "a.json")]) == 0
    (acc,) = json.loads((tmp_path / "a.json").read_text())
    assert acc["runs"] == 2 and acc["decode_range"][0] <= acc["decode_tps"] <= acc["decode_range"][1]
    assert main(args + ["--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_the_cpu_shares_output_is_zero_but_where_the_last_call_wrote():
    z = ZeroedRows(3, pinned=False)
    out = z.take(4, np.array([1, 3, 1]))
    assert out.shape == (4, 3) and not out.any()
    out[[1, 3]] = 7.0
    again = z.take(2, np.array([0]))  # fewer rows: the last call's rows cleared, row 3 beyond this view too
    assert not again.any() and not z.buf.any()
    again[0] = 5.0
    grown = z.take(9, np.array([8]))  # a larger buffer starts at zero
    assert grown.shape == (9, 3) and not grown.any()
    grown[8] = 1.0
    assert not z.take(9, np.array([], np.int64)).any()
