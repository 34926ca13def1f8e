"""A routing trace cut into its requests (prompts or problems), with their texts where the trace ships them,
and split by request into a part that builds the maps and a part that scores them (no request on both sides).
Legend: T = tokens, L = MoE layers, K = experts per token, E = experts per layer, R = requests."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow import MoeflowError
from moeflow.experts.trace import load_trace
from moeflow.maps.store import one_hot_maps


@dataclass
class TraceRequests:
    ids: np.ndarray              # [T, L, K] int64
    weights: np.ndarray | None   # [T, L, K] float32 gate probabilities, or None (ids only)
    offsets: np.ndarray          # [R + 1]: request r covers tokens offsets[r]:offsets[r + 1]
    texts: list[str] | None      # [R] prompt texts, where the trace ships them
    name: str
    experts: int                 # E: the largest id + 1 (a trace records no expert count)

    @property
    def requests(self) -> int:
        return len(self.offsets) - 1

    def maps(self, r: int) -> np.ndarray:
        """[T_r, L, E] maps of request r."""
        a, b = self.offsets[r], self.offsets[r + 1]
        w = None if self.weights is None else self.weights[a:b]
        return one_hot_maps(self.ids[a:b], self.experts, w)


def load_requests(path: str | Path, experts: int | None = None) -> TraceRequests:
    path = Path(path)
    tr = load_trace(path)  # checks existence and format
    ids = tr.ids.numpy()
    w = None if tr.weights is None else tr.weights.numpy()
    E = experts or int(ids.max()) + 1
    if path.suffix == ".npz":
        with np.load(path) as f:
            offsets = f["offsets"].astype(np.int64) if "offsets" in f else np.array([0, len(ids)])
        texts = _prompt_texts(path, len(offsets) - 1)
    else:
        offsets, texts = _jsonl_offsets(path, len(ids)), None
    if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        raise MoeflowError(f"routing trace {path.name}: its offsets do not cover its {len(ids)} tokens in order")
    return TraceRequests(ids, w, offsets, texts, path.name, E)


def _jsonl_offsets(path: Path, tokens: int) -> np.ndarray:
    """Request boundaries of a JSONL trace: its (dataset, problem) keys, in the order load_trace sorts them."""
    counts: dict[tuple, dict] = {}  # problem -> token -> layers recorded
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            c = counts.setdefault((str(r.get("dataset")), r["problem_id"]), {})
            c[r["token_idx"]] = c.get(r["token_idx"], 0) + 1
    L = max(max(c.values()) for c in counts.values())
    sizes = [sum(1 for n in counts[k].values() if n == L) for k in sorted(counts)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if offsets[-1] != tokens:
        raise MoeflowError(f"routing trace {path.name}: {offsets[-1]} complete tokens by problem, {tokens} read")
    return offsets


def _prompt_texts(path: Path, requests: int) -> list[str] | None:
    side = path.with_name(path.name.removesuffix(".npz") + ".prompts.jsonl.gz")
    if not side.is_file():
        return None
    with gzip.open(side, "rt") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts if len(texts) == requests else None


def split_requests(n: int, fit: int | None = None) -> tuple[range, range]:
    """Requests 0..fit-1 build the maps, the rest are scored (default: the first 80%, at least one each)."""
    if n < 2:
        raise MoeflowError(f"the trace has {n} request(s): at least 2 are needed to fit on one and score another")
    fit = max(1, min(n - 1, round(0.8 * n) if fit is None else fit))
    return range(fit), range(fit, n)
