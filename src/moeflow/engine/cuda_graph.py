"""Decode steps of a lone sequence captured as a CUDA graph and replayed.

An eager decode step of a 48-layer MoE issues ~3,700 kernel launches; on the H100 host each costs
25-40 us of CPU, several times the GPU's own work. A graph replays them all for one launch. It needs a
step with no host sync: the expert backend says so with `graph_safe`. The attention spans the whole
slot with a device-side mask (AttnBatch.graph_decode), so one graph serves every position.
"""

from __future__ import annotations

import torch

from moeflow.models.layers import AttnBatch, MoeTransformer


class DecodeGraph:
    def __init__(self, model: MoeTransformer, cache, slot: int, max_len: int, sliding_window: int | None):
        self.model, self.cache, self.slot, self.max_len, self.window = model, cache, slot, max_len, sliding_window
        dev = next(model.parameters()).device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        # Capture at the last position: the warm-up runs write K/V there, and every step writes its own
        # position before any step reads it.
        self.position = torch.full((1,), max_len - 1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialization must not happen during capture
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
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
    return p.is_cuda and getattr(model.experts, "graph_safe", False)
