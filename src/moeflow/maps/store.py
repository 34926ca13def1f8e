"""Expert maps: per decode iteration the L x E gate probabilities of every MoE layer, with the embedding of
the request it came from (the semantic hint's key). fMoE (arXiv 2502.05370) matches them to predict the
experts of the next layers.

What the store keeps (bounded at `capacity` maps):
- within a request, a token's map at cosine similarity >= DEDUP_SIM to the request's last kept map is a
  near-duplicate and is dropped (consecutive tokens often route alike; the kept one predicts the same);
- across requests, once full, a uniform sample of all kept maps seen (reservoir sampling, seeded): every
  request is represented in proportion to its tokens, old and new alike, at a cost of O(1) per map.

File: numpy .npz with `maps` [M, L, E] float16, `emb` [M, D] float16 and `header`, a JSON string
{"format", "layers", "experts", "top_k", "dim", "capacity", "seen", "embedder"}.
Legend: M = maps stored, L = MoE layers, E = experts per layer, K = experts per token, D = embedding width.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from moeflow import MoeflowError

FORMAT = "moeflow-expert-maps-1"
DEDUP_SIM = 0.95
DEFAULT_CAPACITY = 4096


class ExpertMapStore:
    def __init__(self, layers: int, experts: int, top_k: int, dim: int = 0, capacity: int = DEFAULT_CAPACITY,
                 embedder: str = "", seed: int = 0):
        if capacity < 1:
            raise MoeflowError("the expert-map store needs a capacity of at least 1 map")
        self.L, self.E, self.K, self.D, self.capacity = layers, experts, top_k, dim, capacity
        self.embedder = embedder
        self.maps = np.zeros((0, layers, experts), np.float16)   # [M, L, E]
        self.emb = np.zeros((0, dim), np.float16)                # [M, D]
        self.seen = 0  # maps offered after de-duplication (the reservoir's count)
        self._rng = np.random.default_rng(seed)
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []      # appended lazily, stacked on demand

    def __len__(self) -> int:
        self._flush()
        return len(self.maps)

    # -- adding ------------------------------------------------------------------------------------
    def add_request(self, maps: np.ndarray, emb: np.ndarray | None = None) -> int:
        """One request's per-token maps [T, L, E] (probabilities; rows of a layer sum to about one) and its
        embedding [D]. Returns how many maps survived de-duplication."""
        maps = np.asarray(maps, np.float32)
        if maps.ndim != 3 or maps.shape[1:] != (self.L, self.E):
            raise MoeflowError(f"expert maps of shape {maps.shape[1:]} for a store of {self.L} layers x {self.E} "
                               "experts")
        e = np.zeros(self.D, np.float32) if emb is None else np.asarray(emb, np.float32).reshape(-1)
        if e.shape[0] != self.D:
            raise MoeflowError(f"a {e.shape[0]}-wide embedding for a store of {self.D}-wide embeddings")
        kept = dedup(maps)
        for m in maps[kept]:
            self._offer(m, e)
        return len(kept)

    def _offer(self, m: np.ndarray, e: np.ndarray) -> None:
        self.seen += 1
        size = len(self.maps) + len(self._buf)
        if size < self.capacity:
            self._buf.append((m, e))
            return
        j = int(self._rng.integers(self.seen))
        if j < self.capacity:
            self._flush()
            self.maps[j], self.emb[j] = m, e

    def _flush(self) -> None:
        if self._buf:
            self.maps = np.concatenate([self.maps, np.stack([m for m, _ in self._buf]).astype(np.float16)])
            self.emb = np.concatenate([self.emb, np.stack([e for _, e in self._buf]).astype(np.float16)])
            self._buf = []

    # -- checks and files --------------------------------------------------------------------------
    def check(self, layers: int, experts: int, what: str = "the model") -> None:
        if (layers, experts) != (self.L, self.E):
            raise MoeflowError(f"the expert maps are for {self.L} MoE layers x {self.E} experts; {what} has "
                               f"{layers} x {experts}")

    def header(self) -> dict:
        return {"format": FORMAT, "layers": self.L, "experts": self.E, "top_k": self.K, "dim": self.D,
                "capacity": self.capacity, "seen": self.seen, "embedder": self.embedder}

    def save(self, path: str | Path) -> None:
        self._flush()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")  # written whole, then renamed: a reader never sees half
        try:
            np.savez(tmp, maps=self.maps, emb=self.emb, header=np.array(json.dumps(self.header())))
            tmp.replace(path)
        except OSError as err:
            raise MoeflowError(f"cannot write the expert maps to {path}: {err.strerror or err}") from None

    @classmethod
    def load(cls, path: str | Path) -> ExpertMapStore:
        path = Path(path)
        if not path.is_file():
            raise MoeflowError(f"expert-map file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                h = json.loads(str(f["header"]))
                maps, emb = f["maps"], f["emb"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise MoeflowError(f"{path} is not a readable expert-map file ({type(e).__name__}: {e})") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise MoeflowError(f"{path} is not a moeflow expert-map file (format {h.get('format')!r})")
        want = (h["layers"], h["experts"])
        if maps.ndim != 3 or maps.shape[1:] != want or emb.shape != (maps.shape[0], h["dim"]):
            raise MoeflowError(f"{path} is inconsistent: maps {maps.shape}, embeddings {emb.shape}, header "
                               f"{want[0]} layers x {want[1]} experts, {h['dim']}-wide embeddings")
        s = cls(h["layers"], h["experts"], h["top_k"], h["dim"], max(h["capacity"], len(maps)), h["embedder"])
        s.maps, s.emb, s.seen = maps.astype(np.float16), emb.astype(np.float16), int(h["seen"])
        return s


def dedup(maps: np.ndarray, threshold: float = DEDUP_SIM) -> list[int]:
    """Indices of the maps [T, L, E] kept: each one unless it is at cosine >= threshold to the last kept."""
    flat = maps.reshape(len(maps), -1)
    norms = np.linalg.norm(flat, axis=1) + 1e-12
    kept: list[int] = []
    for t in range(len(flat)):
        if kept and flat[t] @ flat[kept[-1]] / (norms[t] * norms[kept[-1]]) >= threshold:
            continue
        kept.append(t)
    return kept


def one_hot_maps(ids: np.ndarray, experts: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Maps [T, L, E] from routing [T, L, K]: the recorded probabilities where given, else 1/K each."""
    T, L, K = ids.shape
    maps = np.zeros((T, L, experts), np.float32)
    w = np.full(ids.shape, 1.0 / K, np.float32) if weights is None else np.asarray(weights, np.float32)
    np.put_along_axis(maps, ids.astype(np.int64), w, axis=2)
    return maps
