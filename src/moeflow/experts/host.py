"""The host side of an offloaded layer: its routing and activations staged in reused (pinned) buffers with
the layer's one sync, the CPU share's output rows, and the routing entries grouped by expert.

Legend: N = tokens, K = experts per token, H = hidden.
"""

from __future__ import annotations

import numpy as np
import torch

from moeflow.experts.store import HostBuffers

BULK_ENTRIES = 64  # routing entries (N x K) from which a layer groups them with numpy (plain Python below)


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

    def fetch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              packed: torch.Tensor | None, with_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(x [N, H] fp32 or None unless with_x, weights, ids) on the host, after the layer's one sync. x comes
        in fp32, converted on the GPU: the CPU kernel reads fp32 activations. packed: the backend's pack()."""
        N, K = topk_ids.shape
        if packed is not None:
            buf = self.to_host("packed", packed)
            nx = N * self.hidden if with_x else 0
            x_h = buf[:nx].view(N, self.hidden) if nx else None
            w_h, ids_h = buf[nx:nx + N * K], buf[nx + N * K:]  # ids as fp32: made ints once read
        else:
            ids_h, w_h = self.to_host("ids", topk_ids), self.to_host("w", topk_weights)
            x_h = self.to_host("x", x.float()) if with_x else None
        if self.cuda:
            self._arrived.record()
            self._arrived.synchronize()
        return x_h, w_h, ids_h

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


def group_entries(ids: torch.Tensor) -> dict[int, list[int] | np.ndarray]:
    """A layer's routing entries by expert: expert -> its flat (token, k) indices, ascending. ids: [N, K] on the
    host, ints or (from a packed transfer) exact fp32. No PyTorch ops: they would wake its thread pool beside
    the CPU experts. Plain Python lists for decode's few entries; numpy arrays for a prompt's thousands (a
    512-token Qwen3 prompt has 4,096 per layer: ~1 ms of Python each)."""
    flat = ids.flatten()
    if flat.numel() < BULK_ENTRIES:
        entries: dict[int, list[int]] = {}
        for i, e in enumerate(map(int, flat.tolist())):
            entries.setdefault(e, []).append(i)
        return entries
    a = flat.numpy().astype(np.int64)
    order = np.argsort(a, kind="stable")
    experts, starts = np.unique(a[order], return_index=True)
    return {int(e): idx for e, idx in zip(experts, np.split(order, starts[1:]))}
