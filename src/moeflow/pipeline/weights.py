"""LayerWeights: a layer's experts on the GPU, a resident share plus the rest streamed in from pinned host memory.

The first `resident` experts of every layer stay on the GPU; the others are copied, in pages of whole experts,
into one of two buffers on a copy stream (double buffering: layer i+1 arrives while layer i computes). Every
block keeps the host layout (down projection transposed), so the same FFN serves host and GPU blocks; a
quantized store's blocks (quant/format.py) stream as they are and run through the quantized layer kernels.
On the CPU (both tiers on one device) the streams and events are no-ops and the copies plain copies.
Legend: L = MoE layers, E = experts, R = resident experts per layer, S = streamed (E - R), W = 3IH weights.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import cache

import torch

from moeflow.experts.biased import biased_layer
from moeflow.experts.cpu import CpuExperts
from moeflow.experts.local import can_group, grouped_experts, partial_ffn, quantized_layer
from moeflow.experts.store import ExpertStore, expert_rows
from moeflow.quant.format import ExpertFormat, QuantSpec

PAGE_BYTES = 64 * 2**20  # one copy call moves at most this much (whole experts)
# One grouped call's gate/up output [entries, 2I] at most: a prompt round or a large micro-batch runs in chunks
# of tokens, each two grouped GEMMs (no host sync), within the workspace the plan counts.
GROUPED_BYTES = 256 * 2**20


def grouped_call_tokens(inter: int, top_k: int, itemsize: int) -> int:
    """Tokens per grouped call: its gate/up output [tokens x top_k, 2 x inter] within GROUPED_BYTES."""
    return max(1, GROUPED_BYTES // (2 * inter * top_k * itemsize))


@cache
def measured_grouped_flops(E: int, K: int, H: int, I: int, tokens: int, device: str, budget: int | None,
                           quant: QuantSpec | None = None, repeats: int = 5) -> float | None:
    """FLOP/s of a prefill pass's expert call (bf16 grouped GEMMs, or quant's fused kernels, as ffn() makes it:
    `tokens` or as many as one call takes, routed uniformly), timed on random experts of one layer; their weight
    reads are in the rate. None where it does not run, or the layer and the call's buffers would pass the GPU
    budget."""
    dev = torch.device(device)
    fmt = ExpertFormat(I, H, torch.bfloat16, quant)
    n = min(tokens, grouped_call_tokens(I, K, 2))
    if budget is not None and E * fmt.block_bytes + 4 * GROUPED_BYTES + 8 * n * H > budget:
        return None
    probe = torch.empty(1, H, device=dev, dtype=torch.bfloat16)
    if not (triton_moe_runs(probe, fmt) if fmt.quantized else can_group(probe)):
        return None
    s = _expert_call_s(E, K, n, fmt, dev, repeats)
    torch.cuda.empty_cache()  # the budget's bytes back before the weights load
    return 6 * K * H * I * n / s


def _expert_call_s(E: int, K: int, n: int, fmt: ExpertFormat, dev: torch.device, repeats: int) -> float:
    """Median seconds of ffn()'s call on n tokens routed uniformly over a layer of E random experts."""
    from moeflow.perf.costs import device_sync, median_s

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, fmt.hidden, generator=g, device=dev, dtype=torch.bfloat16)             # [n, H]
    ids = torch.rand(n, E, device=dev, generator=g).topk(K, dim=1).indices                   # [n, K]
    w = torch.full((n, K), 1.0 / K, device=dev, dtype=torch.bfloat16)                        # [n, K]
    buf = random_blocks(E, fmt, dev)                                                          # [E, W] host layout
    return median_s(lambda: whole_layer(buf, x, ids, w, fmt), device_sync(dev), repeats)


def whole_layer(buf: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                fmt: ExpertFormat, grouped: bool = True, cpu: CpuExperts | None = None, cfg=None) -> torch.Tensor:
    """One call over a layer's experts held whole in buf [E, W] (host layout) -> [N, H]: quantized blocks by the
    quantized kernels, biased ones with their biases (cfg: the model's, for their activation), dense ones in
    grouped GEMMs; in host memory the native kernel (cpu) where it takes the blocks."""
    I, H = fmt.inter, x.shape[1]
    if fmt.quantized:
        return quantized_layer(x, topk_ids, topk_weights, buf, fmt, cpu=cpu)
    if cpu is not None and cpu.uses_native(buf):  # biased bf16 blocks in host memory
        return cpu.layer(buf, x, topk_ids, topk_weights).to(x.dtype)
    gate_up, down_t = buf[:, :2 * I * H].view(-1, 2 * I, H), buf[:, 2 * I * H:3 * I * H].view(-1, I, H)
    if fmt.biased:
        return biased_layer(x, topk_ids, topk_weights, gate_up, down_t, buf[:, 3 * I * H:], fmt, cfg, grouped)
    return grouped_experts(x, topk_ids, topk_weights, gate_up, down_t)


def triton_moe_runs(x: torch.Tensor, fmt: ExpertFormat) -> bool:
    from moeflow.quant import triton_moe

    return triton_moe.available(x, fmt)


def random_blocks(E: int, fmt: ExpertFormat, device: torch.device) -> torch.Tensor:
    """[E, W] one layer of random experts in fmt's blocks (quantized: one expert repeated, a kernel's time does not
    depend on the values)."""
    I, H = fmt.inter, fmt.hidden
    g = torch.Generator(device=device).manual_seed(0)
    if not fmt.quantized:
        return torch.randn(E, 3 * I * H, generator=g, device=device, dtype=fmt.dtype).mul_(0.02)
    one = torch.empty(fmt.block_numel, dtype=fmt.storage_dtype, device=device)
    fmt.pack(*(torch.randn(I, H, generator=g, device=device, dtype=fmt.dtype).mul_(0.02) for _ in range(3)), one)
    return one.expand(E, -1).contiguous()


class LayerWeights:
    def __init__(self, store: ExpertStore, device: torch.device, r_w: float, grouped: bool | None = None):
        self.store, self.device = store, device
        E, self.inter = store.cfg.num_experts, store.cfg.expert_intermediate_size
        self.resident = min(E, math.floor(r_w * E + 1e-9))
        data = store.data                                                     # [L, E, W] host
        self.res = torch.empty((data.shape[0], self.resident, data.shape[-1]), dtype=data.dtype, device=device)
        for row in range(data.shape[0]):  # layer by layer: a layer's R experts are contiguous, no host copy
            self.res[row].copy_(data[row, :self.resident])                    # [L, R, W]
        S = E - self.resident
        # Grouped GEMMs (CUDA bf16) and the quantized kernels want a layer's experts in one [E, W] tensor: each
        # buffer then also takes the layer's resident experts (a device-to-device copy); elsewhere a buffer holds
        # the streamed ones only.
        self.fmt: ExpertFormat = store.fmt
        self.grouped = can_group(self.res) if grouped is None else grouped
        self.whole = self.grouped or self.fmt.quantized or self.fmt.biased
        native = self.fmt.quantized or self.fmt.biased  # the native kernel's formats beyond plain bf16
        self.cpu = CpuExperts(fmt=self.fmt) if native and device.type == "cpu" else None
        rows = E if self.whole else S
        self.bufs = [torch.empty((rows, data.shape[-1]), dtype=data.dtype, device=device) for _ in range(2)] \
            if S else []                                                       # 2 x [E or S, W]
        self.per_page = max(1, PAGE_BYTES // max(store.expert_bytes, 1))
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.loaded = [None, None]   # layer row each buffer holds
        self.ready = [self._event() for _ in range(2)]  # copy into buffer done
        self.freed = [self._event() for _ in range(2)]  # compute on buffer done
        self.bytes_h2d = 0

    def _event(self):
        return torch.cuda.Event() if self.device.type == "cuda" else None

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.close()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.res, *self.bufs])

    def prefetch(self, row: int) -> None:
        """Start copying the streamed experts of layer row `row` into its buffer (no wait)."""
        if not self.bufs or self.loaded[row % 2] == row:
            return
        b, R = row % 2, self.resident
        src, dst = self.store.data[row, R:], self.bufs[b]
        stream = torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext()
        with stream:
            if self.copy_stream is not None:
                self.copy_stream.wait_event(self.freed[b])  # the layer two back has finished with it
            if self.whole:
                dst[:R].copy_(self.res[row], non_blocking=True)
                dst = dst[R:]
            for p in range(0, src.shape[0], self.per_page):
                dst[p:p + self.per_page].copy_(src[p:p + self.per_page], non_blocking=True)
            if self.ready[b] is not None:
                self.ready[b].record(self.copy_stream)
        self.loaded[b] = row
        self.bytes_h2d += src.numel() * src.element_size()

    def acquire(self, row: int) -> None:
        """Make the compute stream wait until layer row `row` has arrived (copying it now if not started)."""
        self.prefetch(row)
        if self.bufs and self.ready[row % 2] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[row % 2])

    def release(self, row: int) -> None:
        """The compute stream is done with layer row `row`'s buffer: the copy two layers on may overwrite it."""
        if self.bufs and self.freed[row % 2] is not None:
            self.freed[row % 2].record(torch.cuda.current_stream(self.device))

    def block(self, row: int, expert: int) -> torch.Tensor:
        """[W] expert `expert` of layer row `row` on the GPU (acquired first)."""
        if self.whole and self.bufs:
            return self.bufs[row % 2][expert]
        if expert < self.resident:
            return self.res[row, expert]
        return self.bufs[row % 2][expert - self.resident]

    def ffn(self, row: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts of layer row `row` on x [N, H] -> [N, H] (fp32 accumulation)."""
        if self.whole:  # in calls of at most grouped_call_tokens tokens, whose buffers the plan counts
            buf = self.bufs[row % 2] if self.bufs else self.res[row]          # [E, W] host layout
            per = grouped_call_tokens(self.inter, topk_ids.shape[1], x.element_size())
            return torch.cat([whole_layer(buf, x[a:a + per], topk_ids[a:a + per], topk_weights[a:a + per], self.fmt,
                                          self.grouped, self.cpu, self.store.cfg) for a in range(0, x.shape[0], per)])
        N, K = topk_ids.shape
        flat = topk_ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.store.cfg.num_experts).tolist()
        out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
        w, start = topk_weights.flatten(), 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            start += n
            tok = idx // K
            y = partial_ffn(x[tok], *expert_rows(self.block(row, e), self.inter, 0, self.inter))  # [n, H]
            out.index_add_(0, tok, y.float() * w[idx, None].float())
        return out.to(x.dtype)
