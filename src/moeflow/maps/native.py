"""fmoe's trajectory match in native code (csrc/maps_match.cpp): built with the C++ compiler on first use, cached,
loaded with ctypes. None where it cannot be built: maps/predict.py Trajectory then uses numpy."""

from __future__ import annotations

import ctypes
import os
import subprocess
import warnings
from functools import cache
from pathlib import Path

import numpy as np

from moeflow.experts.native import build_library

SOURCES = [Path(__file__).resolve().parents[1] / "csrc" / "maps_match.cpp"]
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared")
CAP = 4096  # picks a call returns at most (d layers of E experts: Qwen3's 128 x 2 is 256)


class NativeMatch:
    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.traj_observe.argtypes = [p, i, p, p, p, i]
        lib.traj_observe.restype = f
        lib.traj_observe_sparse.argtypes = [p, p, p, p, i, i, p, p, i]
        lib.traj_observe_sparse.restype = f
        lib.traj_picks.argtypes = [p, p, i, f, p, i, i, i, i, i, i, f, f, p, p, p, i]
        lib.traj_picks.restype = i


class Bound:
    """The native match bound to one predictor's arrays (their addresses taken once: numpy's are slow to read).
    S [M, L, E], St [L, E, M], inv_norm [L, M]: float32, contiguous; St is kept sparse (a map holds K experts a
    layer: a layer's fold reads K x ~M K / E values, not K x M); ids/w: a layer's routing is copied into buffers of
    its own. One Bound serves one thread."""

    def __init__(self, native: NativeMatch, S: np.ndarray, St: np.ndarray, inv_norm: np.ndarray, K: int):
        assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in (S, St, inv_norm))
        self.lib, (self.M, self.L, self.E), self.K = native.lib, S.shape, K
        # St kept sparse, rows (layer, expert) in order: the maps holding that expert, and their values
        flat = St.reshape(self.L * self.E, self.M)
        rows, cols = np.nonzero(flat)
        self.offs = np.searchsorted(rows, np.arange(self.L * self.E + 1)).astype(np.int64)
        self.idx, self.val = cols.astype(np.int32), flat[rows, cols].astype(np.float32)
        self._keep = (S, inv_norm)
        self.S, self.inv = S.ctypes.data, inv_norm.ctypes.data
        self.sparse = tuple(a.ctypes.data for a in (self.offs, self.idx, self.val))
        self.ids, self.w = np.zeros(K, np.int64), np.zeros(K, np.float32)
        self.layer, self.expert = np.empty(CAP, np.int32), np.empty(CAP, np.int32)
        self.use = np.empty(CAP, np.float32)
        self._ptrs = tuple(a.ctypes.data for a in (self.ids, self.w, self.layer, self.expert, self.use))

    def observe(self, dots_ptr: int, layer: int, ids: np.ndarray, w: np.ndarray) -> float:
        """dots [M] += w @ St[layer][ids] (ids, w [K]); returns w . w."""
        self.ids[:] = ids
        self.w[:] = w
        return self.lib.traj_observe_sparse(dots_ptr, *self.sparse, layer, self.E, self._ptrs[0], self._ptrs[1], self.K)

    def picks(self, dots_ptr: int, layer: int, on: float, first: int, last: int, top_m: int, min_use: float,
              decay: float) -> list[tuple[int, int, float]]:
        """Trajectory.picks' (layer, expert, use) after `layer` from the match state (dots [M], on)."""
        inv = self.inv + 4 * layer * self.M
        n = self.lib.traj_picks(dots_ptr, inv, self.M, on, self.S, self.L, self.E, first, last, top_m, self.K,
                                min_use, decay, *self._ptrs[2:], CAP)
        return list(zip(self.layer[:n].tolist(), self.expert[:n].tolist(), self.use[:n].tolist()))


@cache
def load() -> NativeMatch | None:
    """The native match, built if needed; None (with one warning) where no compiler builds it."""
    try:
        return NativeMatch(build_library(os.environ.get("CXX", "g++"), "maps_match", SOURCES, FLAGS))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"moeflow: the native trajectory match is unavailable ({e}); using numpy", stacklevel=2)
        return None
