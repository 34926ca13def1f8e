"""The expert-backend contract: what the MoE layer, the engine and the CUDA graphs may ask of a backend.

A backend runs one MoE layer's routed experts; where the weights live is its business. Capabilities are
methods with defaults here, so callers never probe for attributes. Wrappers (routing replay, recording)
derive from BackendWrapper and forward everything but the call they change.
Legend: N = tokens, K = experts per token, H = hidden.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch


class BackendStats(Protocol):
    """A backend's running figures (OffloadStats): hit rate, bytes moved, CPU/GPU shares."""

    def as_dict(self) -> dict: ...


class ExpertBackend(ABC):
    """Runs the routed experts of one MoE layer: (x [N, H], topk_ids [N, K], topk_weights [N, K]) -> [N, H]."""

    graph_safe: bool = False  # a call makes no host sync, so a whole decode step can be one CUDA graph
    stats: BackendStats | None = None  # running figures, where the backend keeps any

    @abstractmethod
    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor: ...

    def pack(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor | None:
        """What a call needs on the host in one tensor, computed inside a decode graph's piece before the
        layer (engine/cuda_graph.py); None: the backend takes nothing packed."""
        return None

    def run_into(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 packed: torch.Tensor | None, dest: torch.Tensor) -> torch.Tensor:
        """The call with pack()'s result at hand, its output written into dest [N, H]."""
        return dest.copy_(self(layer, x, topk_ids, topk_weights))

    def close(self) -> None:
        """Release threads and buffers the backend holds (idempotent)."""


class BackendWrapper(ExpertBackend):
    """A backend around another: stats and close() are the inner backend's; never graph-safe (a wrapper
    reads or rewrites the routing on the host side of the call)."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner

    @property
    def stats(self) -> BackendStats | None:
        return self.inner.stats

    def close(self) -> None:
        self.inner.close()
