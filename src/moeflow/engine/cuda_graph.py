"""Decode steps of a lone sequence captured as a CUDA graph and replayed.

An eager decode step of a 48-layer MoE issues thousands of kernel launches, each costing more host time than
the GPU's own work. A graph replays them all for one launch. It needs a
step with no host sync: the expert backend says so with `graph_safe`. The attention spans the whole
slot with a device-side mask (AttnBatch.graph_decode), so one graph serves every position.
"""

from __future__ import annotations

import torch

from moeflow.experts.base import ExpertBackend
from moeflow.models.layers import AttnBatch, MoeTransformer


class DecodeGraph:
    def __init__(self, model: MoeTransformer, cache, slot: int, max_len: int, sliding_window: int | None,
                 pool=None):
        self.model, self.cache, self.slot, self.max_len, self.window = model, cache, slot, max_len, sliding_window
        # one memory pool for all of an engine's graphs (they never replay at once): their temporaries share it
        self.pool = pool
        dev = next(model.parameters()).device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        # Capture at the last position: the warm-up runs write K/V there, and every step writes its own
        # position before any step reads it.
        self.position = torch.full((1,), max_len - 1, dtype=torch.long, device=dev)
        # warm-up and capture on one side stream: cuBLAS keeps a workspace per stream, allocated at first use
        self.stream = torch.cuda.Stream(dev)
        self.stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self.stream):
            for _ in range(2):  # warm-up: lazy initialization must not happen during capture
                self._step()
        torch.cuda.current_stream(dev).wait_stream(self.stream)
        self._capture(dev)

    def _capture(self, dev: torch.device) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
            self.logits = self._step()  # [1, V]

    def _step(self) -> torch.Tensor:
        batch = AttnBatch.graph_decode(self.slot, self.position, self.max_len, self.window)
        return self.model.logits(self.model(self.token, batch, self.cache))

    def __call__(self, token: int, position: int) -> torch.Tensor:
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


def graphs_possible(model: MoeTransformer) -> bool:
    p = next(model.parameters())
    return p.is_cuda and model.experts.graph_safe


class _Break(ExpertBackend):
    """Stands in for the expert backend while a piecewise graph is captured: each MoE layer ends the graph
    being captured and starts the next. Its inputs stay as the ended graph's outputs; the output it returns
    is a static tensor that the next graph reads and the replay fills. What the backend's pack() returns is
    computed by the ended graph, so the call makes one transfer (experts/offload.py)."""

    def __init__(self, owner: PiecewiseDecodeGraph):
        self.owner = owner

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        o = self.owner
        if not o.capturing:  # warm-up: no experts (their routing, cache and statistics stay untouched)
            return torch.zeros_like(x)
        packed = o.experts.pack(x, topk_ids, topk_weights)
        o.graphs[-1].capture_end()
        out = torch.empty_like(x)
        o.breaks.append((layer, x, topk_ids, topk_weights, packed, out))
        o.graphs.append(torch.cuda.CUDAGraph())
        o.graphs[-1].capture_begin(pool=o.pool, capture_error_mode="thread_local")
        return out


class PiecewiseDecodeGraph(DecodeGraph):
    """A lone sequence's decode step as one CUDA graph per stretch between MoE layers, for expert backends
    that sync with the host (offloading): everything but the experts replays from graphs, and the experts
    run eagerly in between. Saves the ~40 launches of attention, norms and router per layer."""

    def __init__(self, model: MoeTransformer, cache, slot: int, max_len: int, sliding_window: int | None,
                 pool=None):
        self.experts, self.capturing = model.experts, False
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.breaks: list[tuple] = []  # (layer, x, ids, weights, packed or None, out) per MoE layer, in order
        model.set_experts(_Break(self))
        try:
            super().__init__(model, cache, slot, max_len, sliding_window, pool or torch.cuda.graph_pool_handle())
        finally:
            model.set_experts(self.experts)

    def _capture(self, dev: torch.device) -> None:
        torch.cuda.synchronize(dev)
        self.capturing = True
        with torch.cuda.stream(self.stream):
            self.graphs.append(torch.cuda.CUDAGraph())
            self.graphs[-1].capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self.logits = self._step()
            finally:
                self.graphs[-1].capture_end()
                self.capturing = False
        torch.cuda.current_stream(dev).wait_stream(self.stream)

    def __call__(self, token: int, position: int) -> torch.Tensor:
        self.token.fill_(token)
        self.position.fill_(position)
        for graph, (layer, x, ids, w, packed, out) in zip(self.graphs, self.breaks):
            graph.replay()
            self.experts.run_into(layer, x, ids, w, packed, out)
        self.graphs[-1].replay()
        return self.logits
