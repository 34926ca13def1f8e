"""A routing trace replayed through one cache policy at batch 1, on a timeline of the hardware profile.

Per layer of a token: a selected expert is a hit when it is held and its copy has landed. Misses are copied
in (the policy decides whether the copy keeps a slot) and the layer waits for the cheaper of two paths, as
the engine chooses: all its misses on the CPU (one call), or the copies (after the copy in flight, and after
any late prefetch of the same expert). Copies the policy keeps are made either way (they fill the cache).
Prefetches are issued after the layer's demand copies, highest priority first, only while the copy engine
would start them before the layer ends (its idle time) and only when they land before their target layer can
start; those not started are dropped (the next layer predicts afresh). A prefetch not landed when its
expert is needed is a miss. A prefetched expert evicted or left unused is wasted.
Legend: L = MoE layers, E = experts per layer, K = experts per token, N = L * E keys (layer * E + expert).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moeflow.bench.cache_policies import Belady, Fmoe, SimPolicy

START_TOKENS = 4
# A prefetch is issued only for an expert more likely used than not: one used saves its demand copy, one
# unused is a copy more, so below this the prefetcher would copy more than the demand misses it saves.
MIN_USE = 0.5  # a request's first tokens, where only the semantic hint can predict


@dataclass(frozen=True)
class Timing:
    copy_s: float      # one expert host -> GPU
    cpu_s: float       # one expert at one token on the CPU, within a call
    cpu_call_s: float  # once per layer that has CPU work
    layer_s: float     # a decode layer on the GPU with its experts there
    source: str = ""


@dataclass
class CacheStats:
    policy: str
    capacity: int
    tokens: int = 0
    lookups: int = 0
    hits: int = 0
    start_lookups: int = 0
    start_hits: int = 0
    demand_copies: int = 0
    prefetches: int = 0
    useful_prefetches: int = 0
    late_prefetches: int = 0    # of those, not landed in time (a miss)
    wasted_prefetches: int = 0
    time_s: float = 0.0

    def summary(self) -> dict:
        T = max(self.tokens, 1)
        return asdict(self) | {
            "hit_rate": self.hits / max(self.lookups, 1),
            "start_hit_rate": self.start_hits / max(self.start_lookups, 1),
            "copies_per_token": (self.demand_copies + self.prefetches) / T,
            "wasted_per_token": self.wasted_prefetches / T,
            "ms_per_token": 1e3 * self.time_s / T}


class CacheReplay:
    """Per-key state in plain Python containers (a layer touches K keys: numpy's per-call cost would dominate);
    the policy's ranks are read once per batch of insertions (a layer's misses, or its prefetches), since
    nothing a batch does changes them (its newcomers are protected)."""

    def __init__(self, policy: SimPolicy, capacity: int, layers: int, experts: int, timing: Timing):
        self.p, self.L, self.E, self.tm = policy, layers, experts, timing
        N = layers * experts
        self.cap = max(capacity // layers, 1) if policy.per_layer else capacity
        self.held = bytearray(N)
        self.land = [0.0] * N            # when a held key's copy lands
        self.pref = bytearray(N)         # prefetched, not used since
        self.n_held = [0] * (layers if policy.per_layer else 1)
        self.now = self.cfree = 0.0      # the timeline; when the copy engine is next free
        self.clock = 0
        self.excluded = 0.0  # prefill windows, outside decode time
        self.s = CacheStats(policy.name, capacity)
        for k in policy.first(capacity).tolist():
            self.held[k] = 1
            self.n_held[self._group(k)] += 1
        self._victims: dict | None = None
        self._rank = np.zeros(N)  # [N] ranks of the keys of the batch and the held ones, as read

    def _group(self, key: int) -> int:
        return key // self.E if self.p.per_layer else 0

    # -- slots -------------------------------------------------------------------------------------
    def _batch(self, keys: list[int]) -> None:
        """A batch of insertions of `keys` starts: victims are ranked afresh when first needed."""
        self._victims, self._batch_keys = {}, keys

    def _victim(self, g: int, protect: set) -> int | None:
        """The lowest-ranked held key of group g that is not protected and has landed."""
        v = self._victims.get(g)
        if v is None:
            lo, hi = (g * self.E, (g + 1) * self.E) if self.p.per_layer else (0, len(self.held))
            keys = np.flatnonzero(np.frombuffer(self.held, np.uint8)[lo:hi]) + lo
            r = self.p.rank(keys)
            new = np.asarray(self._batch_keys, np.int64)
            self._rank[keys], self._rank[new] = r, self.p.rank(new)  # what admits() compares
            v = self._victims[g] = [keys[np.argsort(r, kind="stable")].tolist(), 0]
        order, i = v
        while i < len(order):
            k = order[i]
            if self.held[k] and k not in protect and self.land[k] <= self.now:
                v[1] = i
                return k
            i += 1
        v[1] = i
        return None

    def _insert(self, key: int, protect: set) -> bool:
        """A slot for key (evicting when full, never a protected key); False: the policy keeps it out."""
        if self.p.static:
            return False
        g = self._group(key)
        if self.n_held[g] >= self.cap:
            victim = self._victim(g, protect)
            if victim is None or not self.p.admits(key, victim, self._rank):
                return False
            self.held[victim] = 0
            self.s.wasted_prefetches += self.pref[victim]
            self.pref[victim] = 0
            self.n_held[g] -= 1
        self.held[key] = 1
        self.n_held[g] += 1
        return True

    # -- one layer ---------------------------------------------------------------------------------
    def layer(self, l: int, need: np.ndarray, picks: tuple | None, start: bool,
              next_use: np.ndarray | None = None) -> None:
        """need: the K keys selected; picks: (keys, priority, distance in layers, chance of use) to prefetch,
        by priority."""
        tm, s, t0 = self.tm, self.s, self.now
        if isinstance(self.p, Belady):
            self.p.next_use[need] = next_use
        hits, late, miss = 0, [], []
        for k in need.tolist():
            if not self.held[k]:
                miss.append(k)
            elif self.land[k] <= t0:
                hits += 1
            else:
                late.append(k)
            if self.pref[k]:
                s.useful_prefetches += 1
                s.late_prefetches += self.land[k] > t0
                self.pref[k] = 0
        s.lookups += len(need)
        s.hits += hits
        if start:
            s.start_lookups += len(need)
            s.start_hits += hits
        self.p.used(need, self.clock)
        self.clock += 1
        stall = 0.0
        if miss or late:
            protect = set(need.tolist())
            begin = max(self.cfree, t0)
            self._batch(miss)
            kept = [k for k in miss if self._insert(k, protect)]
            copy_end = max(begin + len(miss) * tm.copy_s, max((self.land[k] for k in late), default=t0))
            cpu = tm.cpu_call_s + (len(miss) + len(late)) * tm.cpu_s
            by_copy = copy_end - t0 <= cpu
            stall = min(copy_end - t0, cpu)
            copies = len(miss) if by_copy else len(kept)
            for i, k in enumerate(kept):
                self.land[k] = begin + (i + 1) * tm.copy_s
            if copies:
                self.cfree = begin + copies * tm.copy_s
            s.demand_copies += copies
        end = t0 + tm.layer_s + stall
        if picks is not None:
            self._prefetch(l, picks, t0, end)
        if isinstance(self.p, Fmoe):
            self.p.forget(l * self.E, (l + 1) * self.E)
        self.now = end

    def _prefetch(self, l: int, picks: tuple, t0: float, end: float) -> None:
        keys, prio, dist, use = picks
        if isinstance(self.p, Fmoe):
            self.p.predicted(keys, prio)
        keys, dist, use = keys.tolist(), dist.tolist(), use.tolist()
        protect = set(keys)  # nor one predicted now for another
        if l >= 0:
            protect.update(range(l * self.E, (l + 1) * self.E))  # the running layer's experts are in use
        self._batch(keys)
        copy_s, layer_s = self.tm.copy_s, self.tm.layer_s
        for k, d, u in zip(keys, dist, use):
            if self.held[k] or u < MIN_USE:
                continue
            begin = max(self.cfree, self.now)
            if begin >= end:
                break  # the copy engine has no idle time left in this layer
            if begin + copy_s > t0 + d * layer_s:
                continue  # would land after its layer starts
            if self._insert(k, protect):
                self.land[k] = self.cfree = begin + copy_s
                self.pref[k] = 1
                self.s.prefetches += 1

    def before_request(self, picks: tuple) -> None:
        """A request's start: its semantic picks copied during its prefill's last layer (one layer's time,
        not counted as decode time)."""
        t0 = self.now
        self._prefetch(-1, picks, t0, t0 + self.tm.layer_s)
        self.now += self.tm.layer_s
        self.excluded += self.tm.layer_s

    def token_done(self) -> None:
        self.s.tokens += 1
        self.p.tick()

    def finish(self) -> CacheStats:
        self.s.wasted_prefetches += sum(self.pref)
        self.s.time_s = self.now - self.excluded
        return self.s
