"""The host side of an offloaded layer: its routing and activations staged in reused (pinned) buffers with
the layer's one sync, the CPU share's output rows, and the routing entries grouped by expert.

Legend: N = tokens, K = experts per token, H = hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeflow.experts.store import HostBuffers

BULK_ENTRIES = 64  # routing entries (N x K) from which a layer groups them with numpy (plain Python below)


# decode-sized layers (up to this many values in the packed transfer) keep their views of the staging buffer: a
# view is a PyTorch op, and a decode layer took six of them (each a few microseconds on the GPU's host thread)
VIEW_CACHE_MAX = 1 << 16


@dataclass(frozen=True)
class Staged:
    """A layer's call on the host: x [N, H] fp32 (None unless asked for), the routing weights and ids [N, K]
    (ids as fp32 from a packed transfer), and both flat [N * K] as numpy (reads without PyTorch ops)."""

    x: torch.Tensor | None
    w: torch.Tensor
    ids: torch.Tensor
    w_np: np.ndarray
    ids_np: np.ndarray


class HostStaging:
    """What a layer's call reads on the host, brought there with one sync: reused buffers (pinned with a GPU:
    a layer's are free again at the next, whose sync finds their copies done) and the CPU share's output."""

    def __init__(self, hidden: int, cuda: bool):
        self.hidden, self.cuda = hidden, cuda
        self.buffers = HostBuffers(pinned=cuda)
        self.cpu_out = ZeroedRows(hidden, pinned=cuda)
        # a spinning wait (the driver's, without the GIL): this thread has a core of its own (the CPU kernel
        # leaves one), and a sleeping wait wakes tens of microseconds late, every layer
        self._arrived = torch.cuda.Event() if cuda else None
        # (N, K, with x) -> (the packed buffer [its size], Staged of views into it); a buffer grown since leaves
        # the views on the old one, which stays theirs (each layer's sync finds its copies done)
        self._views: dict[tuple[int, int, bool], tuple[torch.Tensor, Staged]] = {}

    def fetch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              packed: torch.Tensor | None, with_x: bool) -> Staged:
        """x (fp32, or None unless with_x), weights and ids on the host, after the layer's one sync. x comes
        in fp32, converted on the GPU: the CPU kernel reads fp32 activations. packed: the backend's pack()."""
        N, K = topk_ids.shape
        if packed is not None and self.cuda and packed.numel() <= VIEW_CACHE_MAX:
            buf, st = self._packed_views(N, K, with_x, packed.numel())
            buf.copy_(packed, non_blocking=True)
        elif packed is not None:
            buf = self.to_host("packed", packed)
            st = self._split(buf, N, K, with_x)
        else:
            ids_h, w_h = self.to_host("ids", topk_ids), self.to_host("w", topk_weights)
            x_h = self.to_host("x", x.float()) if with_x else None
            st = Staged(x_h, w_h, ids_h, w_h.float().numpy().reshape(-1), ids_h.numpy().reshape(-1))
        if self.cuda:
            self._arrived.record()
            self._arrived.synchronize()
        return st

    def _packed_views(self, N: int, K: int, with_x: bool, n: int) -> tuple[torch.Tensor, Staged]:
        """The reused packed buffer for a decode-sized layer and its views (made once per shape)."""
        hit = self._views.get((N, K, with_x))
        if hit is None or hit[0].numel() != n:
            buf = self.buffers.get("packed", (n,), torch.float32)
            hit = self._views[(N, K, with_x)] = (buf, self._split(buf, N, K, with_x))
        return hit

    def _split(self, buf: torch.Tensor, N: int, K: int, with_x: bool) -> Staged:
        """The packed vector [x (with_x), the routing weights, the expert ids (exact in fp32)] in views."""
        nx = N * self.hidden if with_x else 0
        x_h = buf[:nx].view(N, self.hidden) if nx else None
        w_h, ids_h = buf[nx:nx + N * K], buf[nx + N * K:]
        return Staged(x_h, w_h.view(N, K), ids_h.view(N, K), w_h.numpy(), ids_h.numpy())

    def to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t on the host: itself without a GPU, else copied (asynchronously) into its reused pinned buffer."""
        if not self.cuda:
            return t
        buf = self.buffers.get(name, tuple(t.shape), t.dtype)
        buf.copy_(t, non_blocking=True)
        return buf


class ZeroedRows:
    """A reused host buffer [rows, H] fp32 (pinned where a GPU reads it), all zeros but the rows its last user
    wrote, which the next take() clears: the CPU's share of a layer adds into the rows of its tokens only.
    Clearing those few rows with numpy replaces zeroing all of them with PyTorch, which cost a decode layer
    a PyTorch op and a 512-token prefill layer its whole [512, H] beside the kernel's threads."""

    def __init__(self, hidden: int, pinned: bool):
        self.hidden, self.pinned = hidden, pinned
        self.buf = torch.zeros(0, hidden)
        self.dirty = np.zeros(0, np.int64)

    def take(self, n: int, rows: np.ndarray) -> torch.Tensor:
        """[n, H] of zeros; rows: those the caller will write (row indices < n, repeats allowed)."""
        if n > self.buf.shape[0]:
            self.buf = torch.zeros(max(n, 2 * self.buf.shape[0]), self.hidden, pin_memory=self.pinned)
        elif len(self.dirty):
            self.buf.numpy()[self.dirty] = 0.0
        self.dirty = rows
        return self.buf[:n]


def group_entries(ids: torch.Tensor | np.ndarray) -> dict[int, list[int] | np.ndarray]:
    """A layer's routing entries by expert: expert -> its flat (token, k) indices, ascending. ids: [N, K] or flat
    on the host (a tensor or numpy), ints or (from a packed transfer) exact fp32. No PyTorch ops: they would
    wake its thread pool beside the CPU experts. Plain Python lists for decode's few entries; numpy arrays for
    a prompt's thousands (a 512-token Qwen3 prompt has 4,096 per layer: ~1 ms of Python each)."""
    flat = (ids.numpy() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    if len(flat) < BULK_ENTRIES:
        entries: dict[int, list[int]] = {}
        for i, e in enumerate(map(int, flat.tolist())):
            entries.setdefault(e, []).append(i)
        return entries
    a = flat.astype(np.int64)
    order = np.argsort(a, kind="stable")
    experts, starts = np.unique(a[order], return_index=True)
    return {int(e): idx for e, idx in zip(experts, np.split(order, starts[1:]))}
