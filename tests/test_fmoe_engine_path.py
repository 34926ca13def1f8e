"""fmoe's engine path: the one-token trajectory (maps/predict.py Trajectory) picks what the batch predictor
selects, and the scratch pool of an adaptive split keeps its copies findable (policy/slot_cache.py)."""

import numpy as np

from moeflow.maps.predict import Predictor, Trajectory
from moeflow.maps.store import ExpertMapStore, one_hot_maps
from moeflow.policy.base import SlotSplit
from moeflow.policy.slot_cache import SlotCache

L, E, K = 6, 16, 2


def test_trajectory_matches_the_batch_predictor():
    rng = np.random.default_rng(3)
    store = ExpertMapStore(L, E, K, capacity=64)
    for _ in range(8):
        ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(10)])
        store.add_request(one_hot_maps(ids, E, rng.random(ids.shape).astype(np.float32)))
    pred = Predictor(store, depth=2)
    tok = np.stack([rng.permutation(E)[:K] for _ in range(L)])   # [L, K]
    w = rng.random((L, K)).astype(np.float32)
    tr, state = Trajectory(pred), pred.start(1)
    obs = one_hot_maps(tok[None], E, w[None] / w.sum(1)[None, :, None])[0]  # [L, E]
    for layer in range(L - 1):
        tr.observe(layer, tok[layer], w[layer])
        pred.observe(state, layer, obs[layer][None])
        keys, _, use = pred.select(*pred.trajectory(state, layer)).of(0)
        want = [divmod(int(k), E) for k, u in zip(keys, use) if u >= 0.5]
        got = [(lay, e) for lay, e, _ in tr.picks(layer, 0.5)]
        assert sorted(got) == sorted(want) and (got[:1] == want[:1] or not want)


def test_scratch_pool_keeps_copies_until_taken_again():
    split = SlotSplit(resident=2, cache=3, adaptive=True, scratch_keeps=True)
    cache = SlotCache([(0, 0), (0, 1)], split, layers=2, eviction="decay",
                      prior={(0, 0): 1.0, (0, 1): 1.0})
    s1 = cache.take((1, 5), protect=set(), keep=True)   # not admitted over the popular residents: scratch
    assert cache.lookup((1, 5)) == s1 and s1 >= 2
    s2 = cache.take((1, 6), protect={(1, 5)}, keep=True)
    s3 = cache.take((1, 7), protect={(1, 5), (1, 6)}, keep=True)
    assert len({s1, s2, s3}) == 3 and cache.lookup((1, 7)) == s3
    s4 = cache.take((1, 8), protect={(1, 6), (1, 7)}, keep=True)  # the oldest unprotected goes: (1, 5)
    assert s4 == s1 and cache.lookup((1, 5)) is None and cache.lookup((1, 8)) == s1
    s5 = cache.take((1, 9), protect={(1, 6), (1, 7), (1, 8)}, keep=True)  # all protected: not kept
    assert cache.lookup((1, 9)) is None and s5 in (s1, s2, s3)
    assert cache.lookup((0, 0)) == 0 and cache.lookup((0, 1)) == 1
    plain = SlotCache([(0, 0)], SlotSplit(resident=1, cache=2, adaptive=True), layers=2, eviction="decay",
                      prior={(0, 0): 1.0})
    plain.take((1, 5), protect=set(), keep=True)
    assert plain.lookup((1, 5)) is None  # auto's scratch slots keep nothing


def test_a_trace_shorter_than_a_request_is_refused(tmp_path, capsys):
    from moeflow.cli import main

    trace = tmp_path / "short.npz"
    np.savez(trace, experts=np.zeros((30, 4, 2), np.uint8), offsets=np.array([0, 30]))
    assert main(["bench", "latency", "--model", "synthetic:tiny-mixtral", "--device", "cpu", "--budgets",
                 "0.4GiB", "--routing-trace", str(trace), "--ttft-len", "64", "--new-tokens", "4"]) == 2
    assert "short.npz has 30 tokens, fewer than --ttft-len needs (64)" in capsys.readouterr().err


def test_prefetch_batch_takes_free_then_oldest_scratch_slots():
    split = SlotSplit(resident=2, cache=4, adaptive=True, scratch_keeps=True)
    cache = SlotCache([(0, 0), (0, 1)], split, layers=3, eviction="decay", prior={(0, 0): 1.0, (0, 1): 1.0})
    busy = {2}  # read by the layer running now: not taken
    placed = cache.prefetch_slots([(1, 5), (1, 6), (0, 0), (2, 7), (2, 8)], protect=set(), busy=busy)
    assert placed == [((1, 5), 3), ((1, 6), 4), ((2, 7), 5)]  # (0, 0) is held; no slot left for (2, 8)
    assert all(cache.lookup(k) == s for k, s in placed) and cache.lookup((0, 0)) == 0
    placed = cache.prefetch_slots([(2, 8), (2, 9)], protect={(1, 5)}, busy=busy)
    assert placed == [((2, 8), 4), ((2, 9), 5)]  # the oldest unprotected fills go first
    assert cache.lookup((1, 6)) is None and cache.lookup((1, 5)) == 3


def test_native_trajectory_picks_what_numpy_picks():
    """The native match (csrc/maps_match.cpp) and the numpy one fold the same routing and pick the same experts,
    in the same order, on stores with gate weights and with selections only, over every layer of many tokens."""
    import pytest

    from moeflow.maps import native

    if native.load() is None:
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(7)
    for weighted in (True, False):
        store = ExpertMapStore(L, E, K, capacity=256)
        for _ in range(40):
            ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(12)])
            store.add_request(one_hot_maps(ids, E, rng.random(ids.shape).astype(np.float32) if weighted else None))
        pred = Predictor(store, depth=2)
        for _ in range(20):
            tok = np.stack([rng.permutation(E)[:K] for _ in range(L)])
            w = rng.random((L, K)).astype(np.float32) if weighted else np.ones((L, K), np.float32)
            fast, slow = Trajectory(pred), Trajectory(pred, native=False)
            assert fast.native is not None and slow.native is None
            for layer in range(L - 1):
                fast.observe(layer, tok[layer], w[layer])
                slow.observe(layer, tok[layer], w[layer])
                assert np.allclose(fast.dots, slow.dots, rtol=1e-5) and abs(fast.on - slow.on) < 1e-5
                got, want = fast.picks(layer, 0.5), slow.picks(layer, 0.5)
                assert [k[:2] for k in got] == [k[:2] for k in want]
                assert np.allclose([k[2] for k in got], [k[2] for k in want], rtol=1e-5)
