"""The cache policies `moeflow bench cache` replays, over the flat keys k = layer * E + expert of one model.
Each ranks the held experts (lowest goes first) and says whether a newcomer may take the victim's slot.
Legend: N = L * E keys, L = MoE layers, E = experts per layer."""

from __future__ import annotations

import numpy as np

from moeflow.policy.eviction import HALF_LIFE


class SimPolicy:
    name = ""
    per_layer = False   # the cache is split evenly between the layers (mixtral-offloading)
    static = False      # holds its first choice for the whole run (no copy is kept)
    prefetch = None     # the hints it prefetches from: None, or a subset of {"semantic", "trajectory"}

    def __init__(self, keys: int, prior: np.ndarray):
        """prior [N]: selections per token of each key on the fit requests (popularity)."""
        self.N, self.prior = keys, prior

    def first(self, capacity: int) -> np.ndarray:
        """Keys held at the start: none (a cache that fills as it misses)."""
        return np.zeros(0, np.int64)

    def used(self, keys: np.ndarray, clock: int) -> None:
        """keys were selected at step `clock` (a layer of a token)."""

    def tick(self) -> None:
        """A token has passed."""

    def rank(self, keys: np.ndarray) -> np.ndarray:
        """Eviction ranks of keys: the held key of the lowest rank goes first."""
        raise NotImplementedError

    def admits(self, key: int, victim: int, ranks: np.ndarray) -> bool:
        """May key (just copied in) take victim's slot? ranks: [N] rank() now of (at least) both."""
        return True


class Lru(SimPolicy):
    name = "lru"

    def __init__(self, keys, prior):
        super().__init__(keys, prior)
        self.last = np.full(keys, -1.0)

    def used(self, keys, clock):
        self.last[keys] = clock

    def rank(self, keys):
        return self.last[keys]


class LayerLru(Lru):
    name = "lru-layer"
    per_layer = True


class Lfu(Lru):
    name = "lfu"

    def __init__(self, keys, prior):
        super().__init__(keys, prior)
        self.count = np.zeros(keys)

    def used(self, keys, clock):
        super().used(keys, clock)
        self.count[keys] += 1

    def rank(self, keys):
        return self.count[keys] + self.last[keys] * 1e-9  # ties: the least recent


class Static(SimPolicy):
    """Placement by popularity on the fit requests; misses are never kept."""
    name = "static"
    static = True

    def first(self, capacity):
        return np.argsort(-self.prior, kind="stable")[:capacity]

    def rank(self, keys):
        return self.prior[keys]

    def admits(self, key, victim, ranks):
        return False


class DecayedUses(SimPolicy):
    """auto's adaptive residents (policy/eviction.py DecayedUse): uses counted with a half-life, seeded by
    popularity; a newcomer stays only when it is used more than the one it would replace."""
    name = "auto"

    def __init__(self, keys, prior):
        super().__init__(keys, prior)
        self.t = 0
        steady = prior / (1.0 - 2.0 ** (-1.0 / HALF_LIFE))
        self.level = np.where(steady > 0, np.log2(np.maximum(steady, 1e-300)), -np.inf)

    def first(self, capacity):
        return np.argsort(-self.prior, kind="stable")[:capacity]

    def score(self, keys):
        return 2.0 ** (self.level[keys] - self.t / HALF_LIFE)

    def used(self, keys, clock):
        self.level[keys] = np.log2(self.score(keys) + 1.0) + self.t / HALF_LIFE

    def tick(self):
        self.t += 1

    def rank(self, keys):
        return self.level[keys]

    def admits(self, key, victim, ranks):
        return ranks[key] > ranks[victim]  # the levels order the scores


class Belady(SimPolicy):
    """The offline optimum without prefetch: evict the key used furthest in the future (set by the replay)."""
    name = "belady"

    def __init__(self, keys, prior):
        super().__init__(keys, prior)
        self.next_use = np.full(keys, np.inf)

    def rank(self, keys):
        return -self.next_use[keys]

    def admits(self, key, victim, ranks):
        return ranks[key] > ranks[victim]


class Fmoe(SimPolicy):
    """fMoE: prefetch by the maps' hints; evict the lowest predicted probability x visits (decayed uses). A
    key outside the current prediction has probability 0: among those the least used lately goes first, as in
    auto, whose popularity-seeded start it shares (the engine's fmoe is auto plus the prefetch)."""
    name = "fmoe"
    prefetch = frozenset({"semantic", "trajectory"})

    def __init__(self, keys, prior):
        super().__init__(keys, prior)
        self.visits = DecayedUses(keys, prior)
        self.pred = np.zeros(keys)

    def first(self, capacity):
        return self.visits.first(capacity)

    def used(self, keys, clock):
        self.visits.used(keys, clock)

    def tick(self):
        self.visits.tick()

    def predicted(self, keys: np.ndarray, prob: np.ndarray) -> None:
        self.pred[keys] = prob

    def forget(self, lo: int, hi: int) -> None:
        """Keys lo:hi (a layer's) have run: their prediction is spent."""
        self.pred[lo:hi] = 0.0

    def rank(self, keys):
        v = 2.0 ** (self.visits.level[keys] - self.visits.t / HALF_LIFE)
        return self.pred[keys] * (v + 1.0) * 1e9 + v

    def admits(self, key, victim, ranks):
        return ranks[key] > ranks[victim]


def fmoe_variant(hints: set[str]) -> type[Fmoe]:
    name = "fmoe" if len(hints) == 2 else f"fmoe-{next(iter(hints))[:4]}"
    return type(name.replace("-", "_"), (Fmoe,), {"name": name, "prefetch": frozenset(hints)})


BASELINES: dict[str, type[SimPolicy]] = {p.name: p for p in (Lru, LayerLru, Lfu, Static, DecayedUses, Belady)}
