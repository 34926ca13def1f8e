"""The offloaded layer's host path on the CPU as both tiers: copies issued in batches, auto-prefetch's guesses
staged in scratch slots (used or wasted, counted), the result unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import mixtral_store

from moeflow.experts.local import LocalExperts
from moeflow.experts.offload import OffloadedExperts
from moeflow.perf.costs import ExpertCosts
from moeflow.policy import get_policy
from moeflow.policy.base import SlotSplit
from moeflow.policy.slot_cache import SlotCache

PTS = (1, 4, 16, 64, 256)


def test_a_staged_expert_is_found_until_its_layer_comes_and_a_copy_can_take_its_slot():
    cache = SlotCache([(0, 0), (1, 0)], SlotSplit(resident=2, cache=2, adaptive=True), layers=2, eviction="decay")
    slot = cache.stage((1, 5))
    assert slot in (2, 3) and cache.holds((1, 5)) and cache.lookup((1, 5)) == slot
    other = cache.stage((1, 6), avoid={slot})
    assert other not in (None, slot)
    assert cache.stage((1, 7)) is None  # every scratch slot holds a guess
    assert cache.stage((0, 0)) is None  # held already
    cache.end_layer(1)  # spent: the slots are free again
    assert not cache.holds((1, 5)) and cache.lookup((1, 5)) is None
    slot = cache.stage((0, 3))
    taken = cache.take((0, 4), protect=set(), keep=False, busy=set())  # a demand copy prefers a free slot
    assert taken != slot and cache.holds((0, 3))
    cache.take((0, 5), protect=set(), keep=False, busy={taken})  # ... and else takes the guess's
    assert not cache.holds((0, 3))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@torch.inference_mode()
def test_auto_prefetch_stages_the_last_tokens_experts_and_counts_its_hits(device):
    """Decode steps through two layers: once its guesses have proved themselves (the gate's evidence), a token
    that repeats the last one's routing finds the experts copied ahead (used), one that does not leaves them
    unused (wasted); the output is LocalExperts' throughout."""
    store = mixtral_store(hidden=64, inter=96, layers=2, std=0.05, pin=device == "cuda")
    pol = get_policy("auto-prefetch")
    split = pol.split(4, 2, 8, 2)  # 2 resident, 2 scratch
    costs = ExpertCosts(PTS, tuple(1e-3 * n for n in PTS), tuple(1e-6 for _ in PTS), 1e-4)  # copies are cheap
    backend = OffloadedExperts(store, torch.device(device), pol, split, [(0, 0), (1, 0)], costs=costs)
    backend.calibrate = False
    local = LocalExperts(store.to(device))
    x = torch.randn(1, 64, dtype=torch.bfloat16, device=device)
    w = torch.tensor([[0.6, 0.4]], device=device)
    layers = store.layers
    steps = [[[3, 4], [5, 6]]] * 12 + [[[1, 2], [1, 2]]]
    for step in steps:
        for layer, ids in zip(layers, step):
            ids = torch.tensor([ids], device=device)
            torch.testing.assert_close(backend(layer, x, ids, w), local(layer, x, ids, w), rtol=2e-2, atol=2e-3)
    s = backend.stats
    assert s.prefetched >= 4  # once the gate opened, each layer's guesses for the next
    assert s.prefetch_used >= 2  # the repeated tokens
    assert s.prefetch_wasted >= 2  # the third does not
    assert s.prefetch_used + s.prefetch_wasted <= s.prefetched
    backend.close()


def test_plain_auto_never_prefetches():
    store = mixtral_store(hidden=64, inter=96, layers=2, std=0.05)
    pol = get_policy("auto")
    costs = ExpertCosts(PTS, tuple(1e-3 * n for n in PTS), tuple(1e-6 for _ in PTS), 1e-4)
    backend = OffloadedExperts(store, torch.device("cpu"), pol, pol.split(4, 2, 8, 2), [(0, 0), (1, 0)],
                               costs=costs)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    for _ in range(2):
        for layer in store.layers:
            backend(layer, x, torch.tensor([[3, 4]]), torch.tensor([[0.5, 0.5]]))
    assert backend.stats.prefetched == 0
    backend.close()


@pytest.mark.parametrize("max_groups", [None, 3])
@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_static_waves_pad_their_entries_and_match_the_local_experts(policy, max_groups, monkeypatch):
    """Decode-sized waves as the GPU's graphs run them (entries padded to N x K with weight 0, every chunk of slots
    the wave touches in one pass over one transfer), here eagerly with the CPU's grouped GEMM: LocalExperts'
    output, with the slots in one chunk or (max_groups 3) in two."""
    from conftest import check_slot_waves

    from moeflow.experts import waves as W

    try:
        torch._grouped_mm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16),
                          offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch has no grouped GEMM on the CPU")
    if max_groups:
        monkeypatch.setattr(W, "MAX_GROUPS", max_groups)
    statics, begin = [], W.Waves.begin

    def static_begin(self, x, w_host, K):
        if not self.static_on:
            self.grouped = True
            self.use_static()
        begin(self, x, w_host, K)
        statics.append(self._layer[4])

    monkeypatch.setattr(W.Waves, "begin", static_begin)
    check_slot_waves("cpu", policy, True)
    assert any(statics) and not all(statics)  # decode's layers static, the 40-token ones not


def test_a_busy_copy_engine_moves_the_next_plan_to_the_cpu():
    """auto-prefetch's plan counts the prefetches still in flight: with the copy engine busy for a while the
    misses go to the CPU, where auto (nothing in flight) copies some."""
    import time

    costs = ExpertCosts(PTS, tuple(1e-3 * n for n in PTS), tuple(1e-6 for _ in PTS), 1e-3)
    misses = {1: 1, 2: 1, 3: 1, 4: 1}
    plain = get_policy("auto").plan(misses, costs, 96, 4)
    assert any(r < 96 for r in plain.values())
    pol = get_policy("auto-prefetch")
    assert pol.plan(misses, costs, 96, 4) == plain  # nothing in flight: auto's plan
    pol.ahead.busy_until = time.perf_counter() + 10.0
    assert pol.plan(misses, costs, 96, 4) == {e: 96 for e in misses}


def test_a_used_guess_takes_the_place_of_the_least_used_resident_without_a_copy():
    cache = SlotCache([(0, 0), (1, 0)], SlotSplit(resident=2, cache=2, adaptive=True), layers=2, eviction="decay",
                      prior={(0, 0): 0.01, (1, 0): 1.0})
    slot = cache.stage((0, 5))
    cache.begin(0, broad=False)
    assert cache.lookup((0, 5)) == slot
    cache.end_layer(0, used=[(0, 5)], protect={(0, 5)})
    assert cache.where[(0, 5)] == slot and (0, 0) not in cache.where  # the least used gave up its slot
    assert 0 in cache.groups[None] and slot not in cache.groups[None]  # ... which is scratch now
    unused = cache.stage((1, 6))
    cache.end_layer(1, used=[], protect=set())
    assert not cache.holds((1, 6)) and cache.holder[unused] is None


class _Backend:
    """The Prefetcher a GuessAhead sees: nothing held, every copy taken (recorded), a miss worth `ratio` copies."""

    def __init__(self, ratio: float):
        self.shape, self.layer_copied, self.ratio, self.copied = (2, 8), 0.0, ratio, []

    def holds(self, key):
        return False

    def copy_s(self):
        return 1e-9

    def miss_s(self):
        return self.ratio * 1e-9

    def copy_ahead(self, key, protect=()):
        self.copied.append(key)
        return True


def _decode(pol, backend, tokens):
    """Each token's experts (one pair for both layers) through the policy's prefetch, layer by layer."""
    for pair in tokens:
        for layer in range(2):
            pol.prefetch(layer, torch.tensor([pair]), torch.tensor([[0.6, 0.4]]), backend)


def test_prefetch_stops_when_its_guesses_miss_and_resumes_when_they_hit():
    """The gate scores every guess, copied or not: a cold gate copies nothing until its guesses have proved
    themselves, guesses that never come true keep it shut, and a run of repeated tokens opens it."""
    pol, backend = get_policy("auto-prefetch"), _Backend(ratio=1.0)  # break-even at precision 0.5
    _decode(pol, backend, [[2 * t % 8, 2 * t % 8 + 1] for t in range(40)])  # a token never repeats the last
    assert pol.ahead.precision() < 0.1 and pol.ahead.gate.total > 0
    assert not backend.copied  # measured, never copied
    _decode(pol, backend, [[6, 7]] * 4)
    assert not backend.copied  # still closed, though the guesses now hit
    _decode(pol, backend, [[6, 7]] * 80)
    assert pol.ahead.precision() > 0.5 and backend.copied  # open


def test_a_costly_copy_needs_a_higher_precision():
    """Break-even precision is copy / (miss + copy): guesses right a third of the time pay where a miss costs
    four copies and not where it costs one."""
    tokens = [[0, 1], [0, 1], [2, 3]] * 30  # of two guesses per layer and token, a third hit
    for ratio, pays in ((4.0, True), (1.0, False)):
        pol, backend = get_policy("auto-prefetch"), _Backend(ratio)
        _decode(pol, backend, tokens)
        assert abs(pol.ahead.precision() - 1 / 3) < 0.1
        assert pol.ahead.pays(backend) is pays


def test_auto_prefetches_only_when_switched(monkeypatch):
    from moeflow.policy import auto

    monkeypatch.setattr(auto, "AUTO_PREFETCH", False)
    assert get_policy("auto").ahead is None
    monkeypatch.setattr(auto, "AUTO_PREFETCH", True)
    pol = get_policy("auto")
    assert pol.name == "auto" and pol.ahead is not None
    assert get_policy("fmoe").ahead is None  # its own prefetcher (the maps), not auto's guesses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_staged_views_are_reused_and_read_each_layers_values(device):
    """A decode layer's packed transfer lands in a reused buffer whose views are made once per shape: each
    fetch reads that layer's values, through shapes that grow the buffer and shapes that come back."""
    from moeflow.experts.host import HostStaging

    class _Arrived:  # the CPU stands in for the GPU: the copies are done when issued
        def record(self):
            pass

        def synchronize(self):
            pass

    H, stage = 4, HostStaging(4, cuda=device == "cuda")
    if device == "cpu":
        stage.cuda, stage._arrived = True, _Arrived()
    views = {}
    for step, (N, K, with_x) in enumerate([(1, 2, True), (1, 2, True), (2, 2, False), (3, 2, True), (1, 2, True)]):
        x = torch.randn(N, H, device=device)
        ids = torch.randint(0, 8, (N, K), device=device)
        w = torch.rand(N, K, device=device)
        packed = torch.cat(([x.reshape(-1)] if with_x else []) + [w.reshape(-1), ids.float().reshape(-1)])
        st = stage.fetch(x, ids, w, packed, with_x)
        assert (st.x is not None) == with_x and (not with_x or torch.equal(st.x, x.cpu()))
        assert torch.equal(st.w, w.cpu()) and torch.equal(st.ids.long(), ids.cpu())
        assert st.w_np.tolist() == w.cpu().reshape(-1).tolist() and st.ids_np.tolist() == ids.cpu().reshape(-1).tolist()
        if (N, K, with_x) in views:
            assert views[(N, K, with_x)] is st  # the same views, the new values
        views[(N, K, with_x)] = st


def test_copy_timing_starts_at_the_first_transfer(monkeypatch):
    """A layer's copy time runs from its first transfer, after the copy stream's waits for the waves that last read
    the slots (those are compute time): a copy 1 s long is seen as 1 s whatever the wait before it."""
    from moeflow.experts import calibration

    clock = {"t": 0.0}

    class Event:  # stands in for torch.cuda.Event: the time it was recorded at
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self, stream=None):
            self.at = clock["t"]

        def query(self):
            return True

        def elapsed_time(self, end):  # ms
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(calibration.torch.cuda, "Event", Event)
    costs = ExpertCosts((1,), (1e-3,), (1e-4,), 1.0)  # a whole copy predicted at 1 s
    corr = calibration.CostCorrection(inter=8)
    for wait in (0.0, 5.0, 5.0):
        corr.start_copies("stream", {3: 0}, costs)
        clock["t"] += wait  # the copy stream waits for a wave
        corr.transfers_begin("stream")
        clock["t"] += 1.0   # the copy itself
        corr.end_copies("stream")
        corr.observe_copies()
        assert corr.copy_scale == pytest.approx(1.0)
    corr.start_copies("stream", {3: 0}, costs)  # planned, never issued: nothing timed
    corr.end_copies("stream")
    assert corr._copy_timing is None
