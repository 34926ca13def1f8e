"""fmoe's prefetch gate (policy/prefetch_gate.py): nothing is copied ahead from an empty or unproven store,
picks are admitted by their use scaled by the measured precision, and a batch waits for the last to land."""

import numpy as np
import torch

from moeflow.maps.store import ExpertMapStore, one_hot_maps
from moeflow.policy.fmoe import FmoePolicy
from moeflow.policy.prefetch_gate import PrefetchGate

L, E, K = 6, 16, 2


class FakeExperts:
    """What fmoe's prefetch reads of the offloaded backend: copies are free, nothing is held."""

    shape = (L, E)

    def __init__(self, in_flight: bool = False):
        self.copied: list[tuple[int, int]] = []
        self.in_flight = in_flight

    def holds(self, key):
        return False

    def copy_s(self):
        return 1e-9

    def ahead_in_flight(self):
        return self.in_flight

    def copy_ahead_many(self, keys, protect):
        self.copied += keys
        return len(keys)


def routes(seed: int, tokens: int) -> np.ndarray:
    """[T, L, K] routing: one fixed route per seed (a 'topic'), every token the same."""
    rng = np.random.default_rng(seed)
    route = np.stack([rng.permutation(E)[:K] for _ in range(L)])
    return np.repeat(route[None], tokens, 0)


def decode(policy: FmoePolicy, ids: np.ndarray, experts: FakeExperts) -> None:
    """A prompt step (a request starts), then each token of ids [T, L, K] through the per-layer hook."""
    w = torch.full((1, K), 1.0 / K)
    for layer in range(L):
        policy.prefetch(layer, torch.zeros(3, K, dtype=torch.long), torch.ones(3, K), experts)
    for t in range(len(ids)):
        for layer in range(L):
            policy.layer_s = 1.0  # a slow layer: the copy engine has room for every pick
            policy.prefetch(layer, torch.from_numpy(ids[t, layer])[None], w, experts)


def store_of(*seeds: int) -> ExpertMapStore:
    store = ExpertMapStore(L, E, K, capacity=64)
    for s in seeds:
        store.add_request(one_hot_maps(routes(s, 4), E))
    return store


def test_an_empty_store_prefetches_nothing():
    policy, experts = FmoePolicy(None), FakeExperts()
    decode(policy, routes(0, 20), experts)
    assert experts.copied == [] and policy.prefetched == 0


def test_a_store_that_mispredicts_is_measured_and_copies_nothing():
    policy, experts = FmoePolicy(store_of(1, 2, 3)), FakeExperts()  # other routes than the one decoded
    decode(policy, routes(0, 40), experts)
    assert policy.gate.total >= 16 and policy.gate.calibration < 0.5
    assert experts.copied == []


def test_a_store_that_predicts_prefetches_after_proving_itself():
    policy, experts = FmoePolicy(store_of(0, 1)), FakeExperts()
    decode(policy, routes(0, 1), experts)  # one token's picks scored: not yet evidence enough
    assert policy.gate.calibration == 0 and experts.copied == []
    decode(policy, routes(0, 20), experts)
    assert policy.gate.calibration > 0.9 and experts.copied
    want = {(layer, int(e)) for layer, row in enumerate(routes(0, 1)[0]) for e in row}
    assert set(experts.copied) <= want  # only experts the route uses


def test_no_batch_while_the_last_is_in_flight():
    policy, experts = FmoePolicy(store_of(0)), FakeExperts(in_flight=True)
    decode(policy, routes(0, 20), experts)
    assert policy.gate.calibration > 0.9 and experts.copied == [] and policy.gate.batch == 1.0


def test_gate_calibration_admission_and_window():
    gate = PrefetchGate(window=64, evidence=4)
    picks = [(1, 0, 0.9), (1, 1, 0.6), (2, 3, 0.8)]
    assert gate.admit(picks, 0.5) == []  # nothing scored yet
    for _ in range(10):  # layer 1's picks: expert 0 always selected, expert 1 never
        gate.score(1, np.array([0, 5]), picks)
    assert abs(gate.calibration - 10 / 15) < 0.05
    assert gate.admit(picks, 0.5) == [(1, 0), (2, 3)]  # 0.6 x 2/3 < 0.5
    assert gate.budget(idle=3, in_flight=False) == 1 and gate.budget(idle=3, in_flight=False) == 2
    assert gate.budget(idle=3, in_flight=True) == 0 and gate.batch == 1.5
    assert gate.budget(idle=0, in_flight=False) == 0


def test_a_rebuilt_predictor_is_made_off_the_request_path(monkeypatch):
    """Once a tenth of the maps is new the predictor is rebuilt on a thread: the request that finishes does not
    wait for it, and the next token's first layer takes it once made."""
    import threading

    from moeflow.policy import fmoe

    policy, experts = FmoePolicy(store_of(1)), FakeExperts()
    first, release, made = policy.pred, threading.Event(), []
    build = FmoePolicy._predictor

    def slow(self, store):
        release.wait(5)
        made.append(build(self, store))
        return made[-1]

    monkeypatch.setattr(fmoe.FmoePolicy, "_predictor", slow)
    decode(policy, routes(0, 3), experts)  # a request of another route: new maps
    decode(policy, routes(0, 1), experts)  # its end (the next prompt) starts the rebuild; this token runs meanwhile
    assert policy._builder is not None and policy._builder.is_alive() and policy.pred is first
    release.set()
    policy.flush()
    assert len(made) == 1 and policy.pred is first  # made, not yet taken
    decode(policy, routes(0, 1), experts)  # (its prompt may start another rebuild: the newest made is taken)
    assert policy.pred in made and len(policy.pred.S) > len(first.S)
