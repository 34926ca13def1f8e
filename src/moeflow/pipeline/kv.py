"""HostKV: the pipeline's KV cache in host memory, sized for what the batch holds, not N whole contexts.

Per layer one K and one V arena of P positions (one arena of latent rows for MLA, pipeline/attention.py); each
sequence owns one contiguous run of them (its prompt plus the tokens it may generate), found first-fit and merged
back when it finishes. A run is addressed like a slot whose stride is one position, so the native kernel
(csrc/cpu_attention.cpp) reads it as it reads a slot.
The arenas are touched once when made (zeroed by all cores, with PREFAULT): first writes to fresh pages fault
each page in, and the prefill's single store thread would pay those faults in its path.
Legend: P = arena positions, Hkv = KV heads, D = head dim.
"""

from __future__ import annotations

import bisect
import time

import torch

from moeflow.config import ModelConfig
from moeflow.perf.throughput_model import cpu_attention_shape

# The arenas zeroed when made (all cores take the page faults) rather than touched by the prefill's one store thread
PREFAULT = True


class HostKV:
    def __init__(self, cfg: ModelConfig, positions: int, dtype: torch.dtype, max_seqs: int):
        self.positions, self.max_seqs = positions, max_seqs  # max_seqs: the sequences that run at once
        t, make = time.perf_counter(), torch.zeros if PREFAULT else torch.empty
        self.layers = [tuple(make((positions, *s), dtype=dtype) for s in arena_shapes(cfg))
                       for _ in range(cfg.num_hidden_layers)]                # L x (2 x [P, Hkv, D] or [P, 1, R + Dr])
        self.touch_s = time.perf_counter() - t  # making (and touching) the arenas
        self.free_runs: list[tuple[int, int]] = [(0, positions)]           # (start, length), by start
        self.owned: dict[int, int] = {}                                     # start -> length

    @staticmethod
    def bytes_for(cfg: ModelConfig, positions: int, itemsize: int) -> int:
        return positions * cfg.kv_bytes_per_token(itemsize)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    @property
    def used(self) -> int:
        return sum(self.owned.values())

    def allocate(self, n: int) -> int | None:
        """The start of a free run of n positions (first fit), or None while none is free."""
        for i, (start, length) in enumerate(self.free_runs):
            if length >= n:
                self.free_runs[i:i + 1] = [(start + n, length - n)] if length > n else []
                self.owned[start] = n
                return start
        return None

    def release(self, start: int) -> None:
        n = self.owned.pop(start)
        i = bisect.bisect(self.free_runs, (start, n))
        runs = self.free_runs
        if i < len(runs) and runs[i][0] == start + n:       # merge with the run after
            n += runs.pop(i)[1]
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == start:  # and the run before
            start, n = runs[i - 1][0], runs[i - 1][1] + n
            i -= 1
            runs.pop(i)
        runs.insert(i, (start, n))

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (K, V) arenas: one arena twice where K and V are the same rows (MLA)."""
        return self.layers[layer][0], self.layers[layer][-1]

    def arenas(self, layer: int) -> tuple[torch.Tensor, ...]:
        return self.layers[layer]


def arena_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """One position's shape in each arena of a layer: K and V [Hkv, D]; for latent attention (MLA) one arena of
    [latent | rope key] rows [1, R + Dr], read as both K and V (the decode attends in the latent space)."""
    _, kv_heads, D, shared = cpu_attention_shape(cfg)
    return ((kv_heads, D),) * (1 if shared else 2)
