"""Recorded real routing, replayed in place of the router's choice (benchmarks on synthetic weights); the
backend wrappers that replay routing (TraceRouting) and record it (RoutingRecorder).

Formats (see ../shared/data/README.md):
- .jsonl, one line per (token, layer): {"problem_id", "token_idx", "layer", "experts", "gating_probs"};
  tokens missing a layer are dropped.
- .npz with `experts` [T, L, K] (and `offsets`): ids only; each chosen expert then weighs 1/K.
Legend: T = recorded tokens, L = MoE layers, K = experts per token.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.experts.base import BackendWrapper, ExpertBackend


@dataclass
class RoutingTrace:
    ids: torch.Tensor             # [T, L, K] int64
    weights: torch.Tensor | None  # [T, L, K] float32, or None when not recorded
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.ids.shape)

    def check(self, cfg: ModelConfig) -> None:
        T, L, K = self.shape
        want = (len(cfg.moe_layers), cfg.num_experts_per_tok)
        top = int(self.ids.max()) + 1
        if (L, K) != want or top > cfg.num_experts:
            moe = cfg.moe_layers
            span = f" (layers {moe[0]}..{moe[-1]})" if moe else ""
            raise MoeflowError(f"routing trace {self.name} has {L} MoE layers, top-{K}, expert ids up to {top - 1}; "
                               f"the model has {want[0]} MoE layers{span}, top-{want[1]}, {cfg.num_experts} experts "
                               f"(trace layer i replays the model's i-th MoE layer)")

    def counts(self, num_experts: int) -> torch.Tensor:
        """[L, E] selections per expert, for a placement profile."""
        T, L, K = self.shape
        c = torch.zeros(L, num_experts, dtype=torch.float64)
        for layer in range(L):
            c[layer] = torch.bincount(self.ids[:, layer].flatten(), minlength=num_experts).double()
        return c


def load_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    if not path.is_file():
        raise MoeflowError(f"routing trace {path} does not exist")
    try:
        if path.suffix == ".npz":
            ids = torch.from_numpy(np.load(path)["experts"].astype(np.int64))
            if ids.dim() != 3:
                raise ValueError(f"`experts` has shape {tuple(ids.shape)}, expected [tokens, layers, k]")
            return RoutingTrace(ids, None, path.name)
        return _load_jsonl(path)
    except KeyError as e:
        raise MoeflowError(f"routing trace {path}: a record lacks the field {e} (JSONL records need dataset, "
                           "problem_id, token_idx, layer, experts, gating_probs; NPZ: experts)") from None
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise MoeflowError(f"routing trace {path} could not be read: {e}") from None


def _load_jsonl(path: Path) -> RoutingTrace:
    rows: dict[tuple, dict[int, dict]] = defaultdict(dict)  # (problem, token) -> layer -> row
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r.get("dataset"), r["problem_id"], r["token_idx"])][int(r["layer"])] = r
    if not rows:
        raise ValueError("no records")
    L = max(len(v) for v in rows.values())
    complete = [rows[k] for k in sorted(rows, key=lambda k: (str(k[0]), k[1], k[2])) if len(rows[k]) == L]
    ids = torch.tensor([[r[layer]["experts"] for layer in range(L)] for r in complete], dtype=torch.int64)
    w = torch.tensor([[r[layer]["gating_probs"] for layer in range(L)] for r in complete], dtype=torch.float32)
    return RoutingTrace(ids, w, path.name)


class TraceRouting(BackendWrapper):
    """Expert backend wrapper: each call of layer l takes the next N recorded tokens' routing of layer l
    (wrapping around), so prefill and decode walk the trace in order."""

    def __init__(self, inner: ExpertBackend, trace: RoutingTrace, cfg: ModelConfig):
        trace.check(cfg)
        super().__init__(inner)
        self.trace = trace
        self.slot = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.cursor = [0] * len(cfg.moe_layers)
        self._on: dict = {}  # (device, dtype) -> the trace's ids [T, L, K] and weights there

    def _trace_on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole trace on the device, once, layer-major ([L, T, K]: a layer's next rows are one contiguous
        slice): a copy from pageable host memory each layer would make the host wait for the GPU (and count as
        time outside the experts)."""
        key = (device, dtype)
        if key not in self._on:
            T, L, K = self.trace.shape
            w = self.trace.weights if self.trace.weights is not None else torch.full((T, L, K), 1.0 / K)
            self._on[key] = (self.trace.ids.transpose(0, 1).contiguous().to(device),
                             w.transpose(0, 1).contiguous().to(device, dtype))
        return self._on[key]

    def __call__(self, layer, x, topk_ids, topk_weights):
        N, K = topk_ids.shape
        li, T = self.slot[layer], self.trace.shape[0]
        ids_all, w_all = self._trace_on(topk_ids.device, topk_weights.dtype)
        c = self.cursor[li]
        self.cursor[li] = (c + N) % T
        if c + N <= T:  # a slice: no kernel launched (decode replays one row per layer, every layer)
            return self.inner(layer, x, ids_all[li, c:c + N], w_all[li, c:c + N])
        rows = torch.arange(c, c + N, device=topk_ids.device) % T  # wrapping round the trace's end
        return self.inner(layer, x, ids_all[li, rows], w_all[li, rows])               # [N, K] each


class RoutingRecorder(BackendWrapper):
    """Expert backend wrapper that counts the experts the router picks (for `profile-experts`)."""

    def __init__(self, inner: ExpertBackend, cfg: ModelConfig):
        super().__init__(inner)
        self.slot = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.counts = torch.zeros(len(cfg.moe_layers), cfg.num_experts, dtype=torch.float64)  # [L, E]

    def __call__(self, layer, x, topk_ids, topk_weights):
        ids = topk_ids.flatten().cpu()
        self.counts[self.slot[layer]] += torch.bincount(ids, minlength=self.counts.shape[1]).double()
        return self.inner(layer, x, topk_ids, topk_weights)
