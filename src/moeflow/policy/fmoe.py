"""fmoe: fMoE's trajectory hint in the engine (arXiv 2502.05370; maps/), on top of auto.

Misses are planned as auto plans them (CPU and copy engine sharing the layer) and the resident slots adapt
to use as auto's do (decayed use counts): prefetching must not throw out auto's popular residents. fmoe adds
a pool of scratch slots that keep what is copied into them until the slot is needed again. After each decode
layer of a lone sequence the token's routing so far is matched against the stored maps (maps/predict.py
Trajectory: O(K x M) per layer) and the experts of the next layers more likely used than not are copied in
ahead, in one batch on the copy stream after the layer's own copies. How many is the PrefetchGate's call
(policy/prefetch_gate.py): only picks whose use, scaled by the measured precision of past picks, stays above
MIN_USE (an unwarmed or mismatched store copies nothing), and only while the copy engine has landed the last
batch, at most what it moves in the rest of a layer's time. The current layer's experts and the other picks
are never evicted for a prefetch.
The maps learn on line: a request's maps join the store when the next prompt starts (`expert_maps`: a file
to start from, written back as requests finish; a file that cannot be written is logged once and the engine
goes on with its maps in memory).
Legend: L = MoE layers, E = experts per layer, K = experts per token, M = stored maps.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path

import numpy as np

from moeflow import MoeflowError
from moeflow.maps.predict import Predictor, Trajectory
from moeflow.maps.store import ExpertMapStore
from moeflow.policy.auto import AutoPolicy
from moeflow.policy.base import SlotSplit
from moeflow.policy.prefetch_gate import Pick, PrefetchGate

log = logging.getLogger("moeflow")
MIN_USE = 0.5    # prefetch only an expert more likely used than not (bench/cache_replay.py)
SMOOTHING = 0.2  # weight of the newest layer in the layer-time estimate
DEPTH = 2        # layers predicted ahead: a copy issued now lands within a layer or two
REBUILD = 0.1    # the predictor is rebuilt (a copy of the store) once this share of its maps is new
# the match runs after every MATCH_EVERY-th layer (its cost must stay a few % of a layer's); the layers between
# prefetch what the last match picked and is not there yet
MATCH_EVERY = 2


class FmoePolicy(AutoPolicy):
    name = "fmoe"
    prefetching = False  # its own prefetcher (the maps), not auto's guesses
    modelled = False  # the timing model has no prefetcher: it would predict fmoe as auto

    def __init__(self, store: ExpertMapStore | None = None, depth: int = DEPTH, every: int = MATCH_EVERY):
        super().__init__()
        self.store, self.pred, self.depth, self.every = store, None, depth, max(1, every)
        self.picks: list[Pick] = []  # the last match's, for the layers up to the next one
        self.gate = PrefetchGate()
        if store is not None and len(store):
            self.pred = self._predictor(store)
        self.request: list[np.ndarray] = []   # this request's token maps [L, E]
        self.token: np.ndarray | None = None  # [L, E] of the token being decoded
        self.traj: Trajectory | None = None
        self.layer_s, self._t = 0.0, None
        self.own_copies = 0  # the running layer's demand copies (plan())
        self.prefetched = 0
        self.match_s = 0.0   # host time spent matching and picking (stats)
        self.save_path, self.save_failed = None, False
        self._fresh = 0  # maps added since the predictor was built
        self._builder: threading.Thread | None = None  # a rebuilt predictor in the making (between requests)
        self._built: Predictor | None = None            # ... and made, taken at the next token's start
        self._saver: threading.Thread | None = None

    def use_maps(self, path: str, layers: int, experts: int) -> None:
        """Start from the maps in `path` where it exists, and write the store back there as requests finish."""
        self.save_path = path
        if Path(path).exists():
            self.store = ExpertMapStore.load(path)
            self.store.check(layers, experts)
            self.pred = self._predictor(self.store) if len(self.store) else None

    def _predictor(self, store: ExpertMapStore) -> Predictor:
        """A predictor over the store, its native match built now (between requests), not at a token's first layer."""
        pred = Predictor(store, self.depth)
        pred.bound()
        return pred

    def _rebuild(self) -> None:
        """A predictor over a copy of the store, built on a thread (100-300 ms for DeepSeek-V2-Lite's 4096 maps:
        not in the next prompt's time to first token); one build at a time, a request finishing during one waits
        for the next."""
        if self._builder is not None and self._builder.is_alive():
            return
        snap = self._snapshot()
        self._fresh = 0

        def build():
            self._built = self._predictor(snap)

        self._builder = threading.Thread(target=build, daemon=True)
        self._builder.start()

    def _snapshot(self) -> ExpertMapStore:
        snap = copy.copy(self.store)
        snap._flush()
        snap.maps, snap.emb = snap.maps.copy(), snap.emb.copy()
        return snap

    def _save(self) -> None:
        """The store written back on a thread (a prompt's prefill goes on), from a copy; one write at a time,
        a request finishing during one waits for the next."""
        if self._saver is not None and self._saver.is_alive():
            return
        snap = self._snapshot()
        self._saver = threading.Thread(target=self._write, args=(snap,), daemon=True)
        self._saver.start()

    def _write(self, snap: ExpertMapStore) -> None:
        try:
            snap.save(self.save_path)
        except MoeflowError as e:  # a server keeps serving: the maps stay in memory
            if not self.save_failed:
                log.warning("%s; the expert maps are kept in memory only", e)
            self.save_failed = True

    def flush(self) -> None:
        """Wait for the write and the predictor build in flight (tests, and a server shutting down)."""
        for t in (self._saver, self._builder):
            if t is not None:
                t.join()

    def split(self, slots, layers, experts, top_k):
        # auto's split, its scratch slots grown into a pool that holds what `depth` layers ahead prefetch
        base = super().split(slots, layers, experts, top_k)
        cache = min(base.cache + top_k * self.depth, slots - 1) if slots > base.cache else base.cache
        return SlotSplit(resident=slots - cache, cache=cache, adaptive=True, scratch_keeps=True)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        rows = super().plan(misses, costs, inter, max_copies, keep)
        self.own_copies = sum(1 for r in rows.values() if r < inter)
        return rows

    # -- the maps ----------------------------------------------------------------------------------
    def _request_done(self, L: int, E: int, K: int) -> None:
        if self.token is not None:
            self.request.append(self.token)
        if self.request:
            if self.store is None:
                self.store = ExpertMapStore(L, E, K)
            self._fresh += self.store.add_request(np.stack(self.request))
            if self.pred is None:  # the first maps: at once
                self.pred, self._fresh = self._predictor(self.store), 0
            elif self._fresh >= REBUILD * len(self.pred.S):
                self._rebuild()
            if self.save_path:
                self._save()
        self.request, self.token, self.traj, self.picks = [], None, None, []

    def prefetch(self, l: int, ids, weights, experts) -> None:
        """Layer row l of a step has launched; ids, weights [N, K] its routing on the host."""
        L, E = experts.shape
        N, K = ids.shape
        own, self.own_copies = self.own_copies, 0
        if N != 1:  # a prompt (a new request starts) or several sequences: no trajectory to follow
            if l == 0:
                self._request_done(L, E, K)
            self._t = None
            return
        now = time.perf_counter()
        if self._t is not None:
            self.layer_s += SMOOTHING * ((now - self._t) - self.layer_s) if self.layer_s else now - self._t
        self._t = now
        if l == 0:
            if self.token is not None:
                self.request.append(self.token)
            self.token = np.zeros((L, E), np.float32)
            if self._built is not None:  # a rebuilt predictor is ready
                self.pred, self._built = self._built, None
            self.traj = Trajectory(self.pred) if self.pred is not None and not self.pred.empty else None
        e = np.asarray(ids[0], dtype=np.int64)  # numpy on the engine's path (a tensor in some tests)
        w = np.asarray(weights[0], dtype=np.float32)
        w = w / max(float(w.sum()), 1e-12)
        self.token[l, e] = w
        if self.traj is None:
            return
        self.gate.score(l, e, self.picks)
        if l >= L - 1:
            return
        self.traj.observe(l, e, w)
        if l % self.every == 0:
            self.picks = self.traj.picks(l, MIN_USE)
        else:
            self.picks = [k for k in self.picks if k[0] > l]
        self.match_s += time.perf_counter() - now
        self._prefetch(experts, l, own)

    def _prefetch(self, experts, l: int, own: int) -> None:
        """The picks the gate lets through (calibrated use >= MIN_USE), as many as the copy engine moves in a
        layer's time less the layer's own copies and as the gate's window allows, nearest layer first; none
        while the last batch is still in flight. The current layer's experts and the picks are never evicted."""
        copy_s = experts.copy_s()
        take = self.gate.admit(self.picks, MIN_USE)
        if copy_s <= 0 or not take:
            return
        budget = self.gate.budget(int(self.layer_s / copy_s) - own, experts.ahead_in_flight())
        if budget <= 0:
            return
        keys = [k for k in take if not experts.holds(k)][:budget]  # by priority
        if keys:
            keys.sort(key=lambda k: k[0])  # issued nearest layer first (stable: by priority within a layer)
            protect = {(k[0], k[1]) for k in self.picks} | {(l, e) for e in range(experts.shape[1])}
            self.prefetched += experts.copy_ahead_many(keys, protect)
