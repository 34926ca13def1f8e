"""fMoE's hints (arXiv 2502.05370), vectorized over a batch of tokens.

Trajectory: after layer l, a token's observed maps of layers 0..l are matched (cosine) against every stored
map cut to the same layers; the TOP_M best, weighted by their scores, predict layers l+1..l+d. The dot
products and norms are kept per layer and summed, so a layer costs one [T, E] x [E, M] product.
Semantic: before a token's first layer, its request's embedding is matched against the stored maps'
embeddings; the best predict layers 0..d-1.
Selection: per predicted layer the smallest set of experts whose predicted probability (the layer's row made
to sum to one) reaches 1 - s, s the best match's score in [0, 1], and at least K: a confident match takes its
top experts, a poor one hedges. Priority = probability x DECAY^(distance - 1).
Legend: T = tokens, M = stored maps, L = MoE layers, E = experts, K = experts per token, D = embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow.maps import native as maps_native
from moeflow.maps.store import ExpertMapStore

TOP_M = 8     # stored maps averaged into a prediction
DECAY = 0.5   # a layer further ahead counts half as much as the one before it


class Predictor:
    def __init__(self, store: ExpertMapStore, depth: int = 3, top_m: int = TOP_M, decay: float = DECAY):
        store._flush()
        self.S = np.ascontiguousarray(store.maps, np.float32)         # [M, L, E]
        self.St = np.ascontiguousarray(self.S.transpose(1, 2, 0))     # [L, E, M]: a layer's product reads it in order
        self.ns = np.cumsum((self.S ** 2).sum(2), axis=1)             # [M, L] squared norms of the prefixes
        self.inv_norm = np.ascontiguousarray(1.0 / np.sqrt(np.maximum(self.ns.T, 1e-12)), np.float32)  # [L, M]
        emb = store.emb.astype(np.float32)
        self.emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)  # [M, D]
        self.L, self.E, self.K = store.L, store.E, store.K
        self.depth, self.top_m, self.decay = depth, min(top_m, len(self.S)), decay

    @property
    def empty(self) -> bool:
        return len(self.S) == 0

    def bound(self) -> maps_native.Bound | None:
        """The native match over these maps (Trajectory's), made once (a sparse copy of St: build it where a pause
        does not matter, as fmoe does between requests); None without a compiler or maps. One thread at a time."""
        if not hasattr(self, "_bound"):
            native = maps_native.load()
            self._bound = None if native is None or self.empty else maps_native.Bound(
                native, self.S, self.St, self.inv_norm, self.K)
        return self._bound

    def start(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh trajectory state for a batch of tokens: (dots [T, M], observed squared norms [T])."""
        return np.zeros((tokens, len(self.S)), np.float32), np.zeros(tokens, np.float32)

    def observe(self, state, layer: int, obs: np.ndarray) -> None:
        """Add layer `layer`'s observed maps obs [T, E] to the state."""
        dots, on = state
        dots += obs @ self.St[layer]
        on += (obs ** 2).sum(1)

    def trajectory(self, state, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """After `layer`: predicted maps of layers layer+1.. [T, d, E], scores [T], the first layer predicted."""
        dots, on = state
        score = dots / np.sqrt(np.maximum(on[:, None] * self.ns[None, :, layer], 1e-12))  # [T, M]
        first = layer + 1
        return (*self._blend(score, slice(first, min(first + self.depth, self.L))), first)

    def semantic(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Before layer 0: predicted maps of layers 0..d-1 [T, d, E] from request embeddings emb [T, D]."""
        e = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
        return (*self._blend(e @ self.emb.T, slice(0, min(self.depth, self.L))), 0)

    def _blend(self, score: np.ndarray, layers: slice) -> tuple[np.ndarray, np.ndarray]:
        m = self.top_m
        best = np.argpartition(-score, m - 1, axis=1)[:, :m]                  # [T, m]
        w = np.clip(np.take_along_axis(score, best, 1), 0.0, None) + 1e-6     # [T, m]
        pred = np.einsum("tm,tmle->tle", w, self.S[best, layers]) / w.sum(1)[:, None, None]
        return pred, np.clip(score.max(1), 0.0, 1.0)

    def select(self, pred: np.ndarray, score: np.ndarray, first: int) -> Picks:
        """The experts to fetch for each token of the batch, in priority order."""
        T, d, E = pred.shape
        p = pred / np.maximum(pred.sum(2, keepdims=True), 1e-12)
        order = np.argsort(-p, axis=2)                                        # [T, d, E]
        ps = np.take_along_axis(p, order, 2)
        reach = np.cumsum(ps, axis=2) >= (1.0 - score)[:, None, None] - 1e-6
        count = np.maximum(reach.argmax(2) + 1, self.K)                       # [T, d]
        take = (np.arange(E)[None, None, :] < count[:, :, None]) & (ps > 0)
        t, j, i = np.nonzero(take)
        prio = ps[t, j, i] * self.decay ** j
        use = np.minimum(ps[t, j, i] * self.K, 1.0)  # the chance the expert is among the layer's K
        key = (first + j) * E + order[t, j, i]
        o = np.lexsort((-prio, t))
        return Picks(np.searchsorted(t[o], np.arange(T + 1)), key[o].astype(np.int64), prio[o].astype(np.float32),
                     use[o].astype(np.float32))


@dataclass
class Picks:
    """Experts to fetch for a batch of tokens: token t's are keys[offsets[t]:offsets[t + 1]] (layer * E +
    expert), highest priority first; use: the predicted chance that each is selected."""
    offsets: np.ndarray
    keys: np.ndarray
    prio: np.ndarray
    use: np.ndarray

    def of(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[t], self.offsets[t + 1]
        return self.keys[a:b], self.prio[a:b], self.use[a:b]


class Trajectory:
    """One decoding token's trajectory hint, for the engine: each layer's routing (K ids and weights) folded
    into the match with the stored maps in O(K x M) (the observed map is K-sparse), and the next layers'
    experts picked as Predictor.select does: numpy on [M] and [d, E], the selection in Python on the few
    candidates (no BLAS call: it would wake threads that the CPU experts use)."""

    def __init__(self, pred: Predictor, native: bool = True):
        self.p = pred
        self.dots = np.zeros(len(pred.S), np.float32)  # [M]
        self.on = 0.0
        self.native = pred.bound() if native else None  # one call per layer, not a dozen numpy ones
        self._dots = self.dots.ctypes.data

    def observe(self, layer: int, ids: np.ndarray, w: np.ndarray) -> None:
        """ids, w [K]: layer's selected experts and their weights (made to sum to one)."""
        w = np.asarray(w, np.float32)
        w = w / max(float(w.sum()), 1e-12)
        if self.native is not None:
            self.on += self.native.observe(self._dots, layer, ids, w)
            return
        self.dots += np.einsum("k,km->m", w, self.p.St[layer][ids])  # einsum's own loop, not BLAS
        self.on += float(w @ w)

    def picks(self, layer: int, min_use: float) -> list[tuple[int, int, float]]:
        """After `layer`: (layer, expert, use) of layers layer+1..layer+d whose use (K x predicted share, the
        chance it is among the layer's K) is at least `min_use`, highest priority first."""
        p, first = self.p, layer + 1
        last = min(first + p.depth, p.L)
        if first >= last:
            return []
        if self.native is not None:
            return self.native.picks(self._dots, layer, self.on, first, last, p.top_m, min_use, p.decay)
        score = self.dots * p.inv_norm[layer]          # [M] cosine x |observed| (one factor for all maps)
        M, m = len(score), p.top_m
        # the m best: a partition without indices, then a threshold (argpartition is several times slower)
        best = np.flatnonzero(score >= np.partition(score, M - m)[M - m])[:m]      # [m]
        sc = score[best] / max(np.sqrt(self.on), 1e-6)
        w = np.clip(sc, 0.0, None) + 1e-6
        pred = np.einsum("m,mde->de", w, p.S[best, first:last])                    # [d, E]
        tot = np.maximum(pred.sum(1), 1e-12)                                       # [d]
        j, e = np.nonzero(pred * (p.K / min_use) >= tot[:, None])                  # the candidates: use >= min_use
        q = (pred[j, e] / tot[j]).tolist()
        need = 1.0 - min(max(float(sc.max()), 0.0), 1.0) - 1e-6
        rows: list[list[tuple[float, int]]] = [[] for _ in range(last - first)]
        for row, x, share in zip(j.tolist(), e.tolist(), q):
            rows[row].append((share, x))
        out = []
        for row, c in enumerate(rows):
            c.sort(reverse=True)
            acc, take = 0.0, len(c)
            for n, (share, _) in enumerate(c):
                acc += share
                if acc >= need:
                    take = n + 1
                    break
            decay = p.decay ** row  # the smallest set reaching 1 - s, at least K: a prefix of c
            out += [(share * decay, first + row, x, min(share * p.K, 1.0)) for share, x in c[:max(take, p.K)]]
        out.sort(key=lambda t: -t[0])
        return [(lay, x, use) for _, lay, x, use in out]
