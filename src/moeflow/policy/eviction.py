"""Which cached expert gives up its GPU slot. Resident experts are never candidates, except in an adaptive
split, where every held expert is one and a copied expert is kept only when the policy `admits` it."""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Hashable


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """key was used (a hit, or it was just copied in)."""

    @abstractmethod
    def remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def victim(self, keys: Collection[Hashable], protect: set) -> Hashable | None:
        """Pick one of `keys` (the group's cached experts: a set or a dict's keys, so membership is O(1)) to evict,
        avoiding `protect` where possible."""

    def admits(self, key: Hashable, victim: Hashable) -> bool:
        """Is `key` (just copied in) worth keeping in place of `victim`?"""
        return True

    def admitted(self, keys: list, victim: Hashable) -> list:
        """Those of `keys` that admits() in place of `victim`."""
        return [k for k in keys if self.admits(k, victim)]

    def seed(self, key: Hashable, rate: float) -> None:
        """A prior: key is used `rate` times per step on average (from a popularity profile)."""

    def tick(self) -> None:
        """One step (a token of decode) has passed."""

    def hold(self, key: Hashable) -> None:
        """key now has a slot (a candidate for eviction)."""


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Hashable, None] = OrderedDict()  # least recently used first

    def touch(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, keys, protect):
        # the least recently used of keys outside protect, else of keys; the scan stops there, so an eviction
        # costs the victim's place in the order, not a pass over every held expert
        fallback = None
        for k in self.order:
            if k in keys:
                if k not in protect:
                    return k
                if fallback is None:
                    fallback = k
        return fallback


HALF_LIFE = 16.0  # steps; 4 and 64 moved about as many expert bytes in the replays (docs/benchmarks.md)


class DecayedUse(EvictionPolicy):
    """Uses counted with exponential decay (half-life in steps), seeded by a popularity prior: the least used
    lately goes, and a newcomer stays only if it is used more than the one it would replace. It keeps popular
    experts through a run of misses (LFU) and follows a run of reuse (LRU) within a few half-lives.

    A key's score at step t is 2^(level - t / half_life): the level is invariant while the key is not used,
    so one heap of levels orders the held keys at every step (stale entries skipped lazily)."""

    name = "decay"

    def __init__(self, half_life: float | None = None):
        self.half_life, self.t = half_life or HALF_LIFE, 0
        self.level: dict[Hashable, float] = {}
        self.heap: list[tuple[float, int, Hashable]] = []  # (level, tie-break, key), held keys
        self.held: set = set()
        self._n = 0

    def score(self, key: Hashable) -> float:
        lv = self.level.get(key)
        return 0.0 if lv is None else 2.0 ** (lv - self.t / self.half_life)

    def _set(self, key: Hashable, score: float) -> None:
        lv = math.log2(score) + self.t / self.half_life if score > 0 else -math.inf
        self.level[key] = lv
        if key in self.held:
            self._push(key, lv)

    def _push(self, key: Hashable, lv: float) -> None:
        self._n += 1
        heapq.heappush(self.heap, (lv, self._n, key))
        if len(self.heap) > 4 * len(self.held) + 1024:  # mostly stale entries: rebuild from the held keys
            self.heap = [(self.level[k], i, k) for i, k in enumerate(self.held)]
            heapq.heapify(self.heap)

    def seed(self, key, rate):
        # the steady score of a key used `rate` times per step: rate * sum_t 2^(-t / half_life)
        self._set(key, rate / (1.0 - 2.0 ** (-1.0 / self.half_life)))

    def tick(self):
        self.t += 1

    def touch(self, key):
        # score(key) + 1 set, inline: auto touches every selected expert of every layer
        now = self.t / self.half_life
        lv = self.level.get(key)
        lv = math.log2((0.0 if lv is None else 2.0 ** (lv - now)) + 1.0) + now
        self.level[key] = lv
        if key in self.held:
            self._push(key, lv)

    def hold(self, key):
        self.held.add(key)
        self._push(key, self.level.setdefault(key, -math.inf))

    def remove(self, key):
        self.held.discard(key)

    def victim(self, keys, protect):
        skipped, found, fallback = [], None, None
        while self.heap:
            entry = heapq.heappop(self.heap)
            lv, _, key = entry
            if key not in self.held or self.level[key] != lv:
                continue  # stale: used since, or evicted
            skipped.append(entry)
            if key in keys:
                if key not in protect:
                    found = key
                    break
                if fallback is None:
                    fallback = key
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return found if found is not None else fallback

    def admits(self, key, victim):
        return self.score(key) > self.score(victim)

    def admitted(self, keys, victim):
        bar = self.score(victim)  # admits(), with the victim's score once
        return [k for k in keys if self.score(k) > bar]


EVICTION = {c.name: c for c in (LRU, DecayedUse)}
