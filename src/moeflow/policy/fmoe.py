"""fmoe: fMoE's trajectory hint in the engine (arXiv 2502.05370; maps/). Misses are planned as auto plans
them (CPU and copy engine sharing the layer); the slots are one LRU cache. After each decode layer of a lone
sequence the maps of the token's layers so far are matched against the stored ones, and the experts of the
next layers more likely used than not are copied in ahead, highest priority first, on the copy stream after
the layer's own copies, at most as many as the copy engine moves in a layer's time less the layer's own.
The current layer's experts and the other predicted ones are never evicted for a prefetch. The maps learn on
line: a request's maps join the store when the next prompt starts (`expert_maps`: a file to start from,
written back as requests finish; a file that cannot be written is logged once and the engine goes on).
Legend: L = MoE layers, E = experts per layer, K = experts per token.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from moeflow import MoeflowError
from moeflow.maps.predict import Predictor
from moeflow.maps.store import ExpertMapStore
from moeflow.policy.auto import AutoPolicy
from moeflow.policy.base import SlotSplit

log = logging.getLogger("moeflow")
MIN_USE = 0.5  # prefetch only an expert more likely used than not (bench/cache_replay.py)
SMOOTHING = 0.2  # weight of the newest layer in the layer-time estimate


class FmoePolicy(AutoPolicy):
    name = "fmoe"
    eviction = "lru"
    modelled = False  # the timing model has no prefetcher: it would predict fmoe as auto with no residents

    def __init__(self, store: ExpertMapStore | None = None):
        super().__init__()
        self.store, self.pred = store, None
        self.request: list[np.ndarray] = []   # this request's token maps [L, E]
        self.token: np.ndarray | None = None  # [L, E] of the token being decoded
        self.state = None
        self.layer_s, self._t = 0.0, None
        self.prefetched = 0
        self.save_path, self.save_failed = None, False

    def use_maps(self, path: str, layers: int, experts: int) -> None:
        """Start from the maps in `path` where it exists, and write the store back there as requests finish."""
        self.save_path = path
        if Path(path).exists():
            self.store = ExpertMapStore.load(path)
            self.store.check(layers, experts)
            self.pred = Predictor(self.store)

    def _save(self) -> None:
        try:
            self.store.save(self.save_path)
        except MoeflowError as e:  # a server keeps serving: the maps stay in memory
            if not self.save_failed:
                log.warning("%s; the expert maps are kept in memory only", e)
            self.save_failed = True

    def split(self, slots, layers, experts, top_k):
        return SlotSplit(resident=0, cache=slots)

    def min_slots(self, layers, experts, top_k):
        return top_k

    # -- the maps ----------------------------------------------------------------------------------
    def _request_done(self, L: int, E: int, K: int) -> None:
        if self.token is not None:
            self.request.append(self.token)
        if self.request:
            if self.store is None:
                self.store = ExpertMapStore(L, E, K)
            self.store.add_request(np.stack(self.request))
            self.pred = Predictor(self.store)
            if self.save_path:
                self._save()
        self.request, self.token, self.state = [], None, None

    def prefetch(self, l: int, ids, weights, experts) -> None:
        """Layer row l of a step has launched; ids, weights [N, K] its routing on the host."""
        L, E = experts.shape
        N, K = ids.shape
        if N != 1:  # a prompt (a new request starts) or several sequences: no trajectory to follow
            if l == 0:
                self._request_done(L, E, K)
            return
        now = time.perf_counter()
        if self._t is not None:
            self.layer_s += SMOOTHING * ((now - self._t) - self.layer_s) if self.layer_s else now - self._t
        self._t = now
        if l == 0:
            if self.token is not None:
                self.request.append(self.token)
            self.token = np.zeros((L, E), np.float32)
            self.state = self.pred.start(1) if self.pred is not None and not self.pred.empty else None
        e = np.asarray(ids[0].tolist(), np.int64)
        w = np.asarray(weights[0].tolist(), np.float32)
        obs = np.zeros(E, np.float32)
        obs[e] = w / max(float(w.sum()), 1e-12)
        self.token[l] = obs
        if self.state is not None and l < L - 1:
            self.pred.observe(self.state, l, obs[None])
            self._prefetch(experts, l, self.pred.select(*self.pred.trajectory(self.state, l)).of(0))

    def _prefetch(self, experts, l: int, picks) -> None:
        """The picks more likely used than not, as many as the copy engine moves in a layer's time; the current
        layer's experts and the other picks are never evicted for one."""
        keys, _, use = picks
        E, copy_s = experts.shape[1], experts.copy_s()
        budget = int(self.layer_s / copy_s) if copy_s > 0 else 0
        wanted = [divmod(int(k), E) for k, u in zip(keys, use) if u >= MIN_USE]
        protect = set(wanted) | {(l, e) for e in range(E)}
        for key in wanted[:budget]:
            if not experts.holds(key) and experts.copy_ahead(key, protect):
                self.prefetched += 1
