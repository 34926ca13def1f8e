"""The GPU's share of an offloaded layer, in waves: the experts in a set of slots on their entries, in one pass.

A wave runs as two grouped GEMMs over the slots (CUDA bf16), or slot by slot (other devices and dtypes, and waves
too large for the grouped path's workspace). Small waves (decode) replay a CUDA graph: an eager wave is about
ten launches, each more host time than the GPU's own work; a graph is one. Their entries are padded to N x K
(weight 0), so one graph serves every entry count, and a wave touching two chunks of slots is still one graph
and one transfer.

Legend: N = tokens, K = experts per token, H = hidden, I = intermediate rows, S = slots, M = a wave's entries
(flat (token, k) indices into the layer's routing).
"""

from __future__ import annotations

import numpy as np
import torch

from moeflow.experts.ffn import block_ffn, can_group, grouped_ffn
from moeflow.experts.store import HostBuffers
from moeflow.perf.costs import grouped_cap, grouped_passes
from moeflow.quant import grouped as qgrouped
from moeflow.quant import triton_int4
from moeflow.quant.format import ExpertFormat

# Waves run as grouped GEMMs in passes of at most grouped_cap(the step's tokens, per_token) entries: a pass
# holds every entry's intermediate activations at once, and the workspace holds per_token entries' per token.
# Layers of up to this many entries (N * K: decode, small batches) replay graphs, one per (N, K, chunks touched,
# first pass), at most GRAPH_MAX_SHAPES of them (others run eagerly).
GRAPH_MAX_ENTRIES = 16
GRAPH_MAX_SHAPES = 64
# PyTorch's grouped GEMM takes fewer than 1024 groups: the slots go in chunks of 1023 (Qwen3-30B-A3B at 16 GiB
# has ~1,400 slots), a wave in one grouped pass per chunk it touches.
MAX_GROUPS = 1023

Wave = dict[int, tuple[list[int], "torch.cuda.Event | None"]]  # slot -> (entries, arrival of its copy)


def wave_ops(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, meta: torch.Tensor, M: int, K: int,
             gate_up: torch.Tensor, down_t: torch.Tensor, zero: bool = False, bias: torch.Tensor | None = None,
             fmt=None) -> None:
    """out [N, H] fp32 += each entry's expert on its token, weighted (zero: out = that, the layer's first pass).
    meta [M + G + M] int32: the entries sorted by slot, the cumulative entries per slot, their weights (fp32
    bits; w [M] fp32 is that view); gate_up [G, 2I, H], down_t [G, I, H] the slots' views; biased experts:
    bias [G, 2I + H] and their format (experts/biased.py)."""
    idx = meta[:M].long()
    tok = idx // K
    offs = meta[M:M + gate_up.shape[0]]
    y = (grouped_ffn(x[tok], gate_up, down_t, offs) if bias is None                   # [M, H]
         else fmt.grouped_ffn(x[tok], gate_up, down_t, bias, offs))
    if zero:
        out.zero_()
    out.index_add_(0, tok, torch.mul(y, w[:, None]))  # the weights are fp32: so is the product


class Waves:
    """Runs a layer's waves over the expert slots [S, 3IH] and keeps, per slot, the event after its last use
    (a copy into the slot waits for it)."""

    def __init__(self, slots: torch.Tensor, inter: int, graphs: bool = True, per_token: float = 1.0,
                 fmt: ExpertFormat | None = None):
        # quantized slots: a pass's slots dequantized together (quant/grouped.py) where they fit, else slot by slot
        self.fmt = fmt if fmt is not None and fmt.quantized else None
        S, H = slots.shape[0], fmt.hidden if fmt is not None else slots.shape[1] // (3 * inter)
        self.slots, self.inter, self.hidden, self.per_token = slots, inter, H, per_token
        self.ffn = block_ffn(inter, fmt)  # one slot's expert, where a wave runs slot by slot
        self.biased = () if fmt is None or not fmt.biased else (slots[:, 3 * inter * H:], fmt)  # [S, 2I + H]
        if not self.fmt:
            self.gate_up = slots[:, :2 * inter * H].view(S, 2 * inter, H)   # views for the grouped GEMMs
            self.down_t = slots[:, 2 * inter * H:3 * inter * H].view(S, inter, H)
        self.grouped = (can_group(slots) and not self.fmt and (fmt is None or not fmt.biased or fmt.groupable)
                        or qgrouped.groupable(slots, self.fmt, GRAPH_MAX_ENTRIES))
        self.triton = qgrouped.triton_waves(slots, self.fmt)  # quantized: the fused kernels, not dequantized
        self.grouped = self.grouped or self.triton
        self.gemv = qgrouped.gemv_waves(slots, self.fmt)  # int4 decode waves: GEMVs over the slots in place
        self.cuda = slots.is_cuda
        self.graphs_on = graphs and self.cuda
        # slot -> (n, event after the n-th wave that read it); the copy stream has waited for waves up to
        # _waited[1] of the compute stream _waited[0] (in order: waiting for wave n covers every earlier one)
        self.slot_free: dict[int, tuple[int, torch.cuda.Event, int]] = {}
        self._n_free = 0
        self._waited: tuple[object, int] = (None, 0)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # (N, K, chunks, first pass) -> graph
        # Staging of each wave's meta (pinned with a GPU): the k-th wave of a layer takes buffer k. The next
        # layer's host sync finds every copy out of them done, so they are free again by then.
        self._stage = HostBuffers(pinned=self.cuda)
        self._waves = 0
        # (x, host weights [N * K] fp32, out, K, static, x staged) of the layer being run
        self._layer: tuple | None = None
        self._written = False  # a wave has written the layer's accumulator
        self.static_on = False
        if self.graphs_on:
            self.use_static()
            self.pool = torch.cuda.graph_pool_handle()  # the wave graphs' own: their temporaries die inside them
            self.capture_stream = torch.cuda.Stream(slots.device)

    def use_static(self) -> None:
        """Small waves run as static ones (fixed buffers, padded entries): replayed graphs with CUDA graphs on,
        else the same ops eagerly (tests on the CPU). The graphs' inputs and output live here; a layer copies its
        x in at its first wave."""
        n, (S, H), dev = GRAPH_MAX_ENTRIES, (self.slots.shape[0], self.hidden), self.slots.device
        # views made once (each is a PyTorch op on the host's path to the GPU): N -> (x_s[:N], out_s[:N]);
        # (the layer's k-th wave, its meta's size) -> (host staging, its numpy view, meta_s[:size])
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._metas: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray, torch.Tensor]] = {}
        self.static_on = self.grouped or self.gemv
        self.x_s = torch.zeros(n, H, dtype=self.fmt.dtype if self.fmt else self.slots.dtype, device=dev)
        self.out_s = torch.zeros(n, H, dtype=torch.float32, device=dev)
        chunks = -(-S // MAX_GROUPS)
        # per chunk: 2 N K + G (quantized: one segment of 2 N K + 2 W, the slots' ids after the weights)
        self.meta_s = torch.zeros(2 * n * chunks + S + n, dtype=torch.int32, device=dev)

    def begin(self, x: torch.Tensor, w_host: np.ndarray, K: int) -> None:
        """A layer starts: x [N, H]; w_host [N * K] fp32 its routing weights on the host (each wave's go with its
        entries in one transfer)."""
        N = x.shape[0]
        self._waves = 0
        # static where grouped, or decode sizes the GEMVs take (their waves' slots hold N entries at most)
        static = self.static_on and N * K <= GRAPH_MAX_ENTRIES and (self.grouped or N <= triton_int4.GEMV_MAX_TOKENS)
        # static: the graphs' buffer, zeroed by the layer's first pass (one launch fewer); else zeros now
        out = self._static_rows(N)[1] if static else torch.zeros(N, self.hidden, dtype=torch.float32,
                                                                  device=x.device)
        self._layer = (x, w_host, out, K, static, False)
        self._written = not static

    def result(self) -> torch.Tensor | None:
        """The layer's GPU share [N, H] fp32; None where no wave wrote it (all on the CPU)."""
        return self._layer[2] if self._written else None

    def run(self, wave: Wave) -> None:
        """The experts in these slots on their entries, weighted, into the layer's accumulator, once each slot's
        copy has landed. A slot holding rows r:I of a split expert has gate rows 0:r zeroed, so the whole
        expert's FFN there is the part's (silu(0) = 0)."""
        x, w_host, out, K, static, staged = self._layer
        stream = torch.cuda.current_stream(self.slots.device) if self.cuda else None
        waited = set()  # a batch of copies shares one event: waited for once
        for _, ready in wave.values():
            if ready is not None and id(ready) not in waited:
                waited.add(id(ready))
                stream.wait_event(ready)
        if static and not staged:  # the layer's activations into the graphs' buffer, at its first wave
            self._static_rows(x.shape[0])[0].copy_(x)
            self._layer = (x, w_host, out, K, static, True)
        order = sorted(wave)
        # quantized: one "chunk", the wave's own slots dequantized (W groups, not a chunk's)
        chunks = [0] if self.dequantized else sorted({slot // MAX_GROUPS * MAX_GROUPS for slot in order})
        if static:
            self._run_static(chunks, order, wave)
        cap = grouped_cap(x.shape[0], self.per_token) if not static else 0
        for c0 in chunks if not static else ():
            chunk = order if self.dequantized else [slot for slot in order if c0 <= slot < c0 + MAX_GROUPS]
            passes = grouped_passes([len(wave[s][0]) for s in chunk], cap) if self.grouped else [range(len(chunk))]
            if self.dequantized and not self.triton:
                passes = qgrouped.cut_passes(passes, qgrouped.slots_per_pass(self.fmt))
            for p in passes:
                self._run_chunk(c0, [chunk[i] for i in p], wave)
        if stream is not None:
            self._n_free += 1
            free = (self._n_free, stream.record_event(), stream.cuda_stream)
            self.slot_free.update(dict.fromkeys(order, free))

    @property
    def dequantized(self) -> bool:
        """Quantized slots in grouped passes: each pass's slots dequantized together."""
        return self.fmt is not None and self.grouped

    def wait_free(self, slot: int, copy_stream: torch.cuda.Stream) -> None:
        """copy_stream waits until the last wave that read `slot` is done (once for several slots of one
        wave or of earlier waves of the same compute stream)."""
        free = self.slot_free.get(slot)
        if free is None:
            return
        n, event, compute = free
        if self._waited[0] == compute and self._waited[1] >= n:
            return
        copy_stream.wait_event(event)
        self._waited = (compute, n)

    def _run_chunk(self, c0: int, order: list[int], wave: Wave) -> None:
        """Some of the wave's slots in c0 : c0 + MAX_GROUPS (sorted): one grouped pass, or (where grouped GEMMs
        cannot run) slot by slot."""
        x, w_host, out, K, _, _ = self._layer
        quant = self.dequantized  # G = the pass's slots, their ids after the weights
        G = len(order) if quant else min(MAX_GROUPS, self.slots.shape[0] - c0)
        # entries sorted by slot, offs = cumulative entries per slot of the chunk (G of them: ~1,000 with Qwen3's
        # slots, so numpy, not a Python list), the entries' weights: one transfer
        parts = [wave[slot][0] for slot in order]  # lists, or numpy from a prompt's bookkeeping
        M = sum(len(e) for e in parts)
        buf = self._stage.get(self._waves, (2 * M + G + quant * G,), torch.int32)
        self._waves += 1
        meta_h = buf.numpy()  # numpy, not PyTorch ops: no dispatch on the path to the GPU
        meta_h[:M] = [i for e in parts for i in e] if isinstance(parts[0], list) else np.concatenate(parts)
        counts = meta_h[M:M + G]
        counts[:] = 0
        counts[np.arange(G) if quant else np.array(order) - c0] = [len(e) for e in parts]
        np.cumsum(counts, out=counts)
        meta_h[M + G:2 * M + G].view(np.float32)[:] = w_host[meta_h[:M]]
        if quant:
            meta_h[2 * M + G:] = order
        meta = buf.to(self.slots.device, non_blocking=True) if self.cuda else buf
        w = meta[M + G:2 * M + G].view(torch.float32)  # [M]
        if quant:
            self._quantized_ops(out, x, meta, M, G, K)
            return
        if self.grouped:
            wave_ops(out, x, w, meta, M, K, self.gate_up[c0:c0 + G], self.down_t[c0:c0 + G], False,
                     *self._bias(c0, G))
            return
        tok = meta[:M].long() // K
        b = 0
        for slot in order:
            a, b = b, b + len(wave[slot][0])
            y = self.ffn(x[tok[a:b]], self.slots[slot])
            out.index_add_(0, tok[a:b], torch.mul(y, w[a:b, None]))

    def _run_static(self, chunks: list[int], order: list[int], wave: Wave) -> None:
        """A small wave (decode) in one replay: per chunk of slots it touches, its entries padded to N * K (the
        pads repeat the last entry, weight 0: one graph per chunk set, not per entry count), the offsets and the
        weights, all in one transfer."""
        if self.fmt:
            self._run_static_quant(order, wave)
            return
        x, w_host, _, K, _, _ = self._layer
        N = x.shape[0]
        P = N * K
        sizes = [2 * P + self._groups(c0) for c0 in chunks]
        buf, meta_h, meta_d = self._static_meta(self._waves, sum(sizes))
        self._waves += 1
        o = 0
        for c0, n in zip(chunks, sizes):
            seg, G = meta_h[o:o + n], n - 2 * P
            o += n
            slots = [s for s in order if c0 <= s < c0 + G]
            _padded_segment(seg, P, G, np.array(slots) - c0, [wave[s][0] for s in slots], w_host)
        meta_d.copy_(buf, non_blocking=True)
        self._replay(N, K, tuple(chunks), zero=not self._written)
        self._written = True

    def _run_static_quant(self, order: list[int], wave: Wave) -> None:
        """A small wave of quantized slots in one replay: its entries padded to N * K as in _run_static, the offsets
        over its W slots, the weights, then the slots' ids (dequantized in the graph), one graph per (N, K, W)."""
        x, w_host, _, K, _, _ = self._layer
        N, W = x.shape[0], len(order)
        P = N * K
        buf, meta_h, meta_d = self._static_meta(self._waves, 2 * P + 2 * W)
        self._waves += 1
        _padded_segment(meta_h, P, W, np.arange(W), [wave[s][0] for s in order], w_host)
        meta_h[2 * P + W:] = order
        meta_d.copy_(buf, non_blocking=True)
        self._replay(N, K, ("quantized", W), zero=not self._written)
        self._written = True

    def _quantized_ops(self, out: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, M: int, W: int, K: int,
                       zero: bool = False) -> None:
        """wave_ops over W quantized slots, meta [M entries, W offsets, M weights, W slot ids]: the int4 GEMVs
        (a slot holds the entries of N tokens at most, and of M - W + 1: each slot has one) or the fused Triton
        kernels reading the slots in place, or the slots dequantized for the grouped GEMMs."""
        most = min(x.shape[0], M - W + 1)
        if self.gemv and most <= triton_int4.GEMV_MAX_TOKENS:
            if zero:
                out.zero_()
            triton_int4.wave_gemv(out, x, meta, M, W, K, self.slots, self.fmt, most)
            return
        if not self.triton:
            weights = qgrouped.dequantize_slots(self.slots, meta[2 * M + W:].long(), self.fmt)
            wave_ops(out, x, meta[M + W:2 * M + W].view(torch.float32), meta, M, K, *weights, zero)
            return
        if zero:
            out.zero_()
        qgrouped.fused_wave(out, x, meta, M, W, K, self.slots, self.fmt)

    def _groups(self, c0: int) -> int:
        return min(MAX_GROUPS, self.slots.shape[0] - c0)

    def _static_rows(self, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_s[:N], out_s[:N]), made once per N."""
        rows = self._rows.get(N)
        if rows is None:
            rows = self._rows[N] = (self.x_s[:N], self.out_s[:N])
        return rows

    def _static_meta(self, k: int, n: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """The k-th wave's host staging of n values (a tensor and its numpy view) and meta_s[:n], made once. A
        staging buffer grown since leaves the views on the old one, which stays theirs (each layer's sync finds
        the copies out of it done)."""
        hit = self._metas.get((k, n))
        if hit is None:
            buf = self._stage.get(k, (n,), torch.int32)
            hit = self._metas[(k, n)] = (buf, buf.numpy(), self.meta_s[:n])
        return hit

    def _static_ops(self, out: torch.Tensor, N: int, K: int, chunks: tuple[int, ...], zero: bool) -> None:
        """What a static wave's graph holds: wave_ops per chunk on its segment of meta_s (see _run_static)."""
        P, o = N * K, 0
        if self.fmt:  # chunks = ("quantized", W): see _run_static_quant
            W = chunks[1]
            self._quantized_ops(out, self.x_s[:N], self.meta_s[:2 * P + 2 * W], P, W, K, zero)
            return
        for i, c0 in enumerate(chunks):
            G = self._groups(c0)
            meta = self.meta_s[o:o + 2 * P + G]
            o += 2 * P + G
            wave_ops(out, self.x_s[:N], meta[P + G:].view(torch.float32), meta, P, K,
                     self.gate_up[c0:c0 + G], self.down_t[c0:c0 + G], zero and i == 0, *self._bias(c0, G))

    def _replay(self, N: int, K: int, chunks: tuple[int, ...], zero: bool) -> None:
        key = (N, K, chunks, zero)
        graph = self.graphs.get(key)
        if not self.graphs_on or (graph is None and len(self.graphs) >= GRAPH_MAX_SHAPES):
            self._static_ops(self.out_s[:N], N, K, chunks, zero)
            return
        if graph is None:
            graph = self.graphs[key] = self._capture(lambda out: self._static_ops(out, N, K, chunks, zero), N)
        graph.replay()

    def _bias(self, c0: int, G: int) -> tuple:
        """wave_ops' bias arguments for slots c0 : c0 + G: none, or (their biases, the format)."""
        return (self.biased[0][c0:c0 + G], self.biased[1]) if self.biased else ()

    def _capture(self, ops, N: int) -> torch.cuda.CUDAGraph:
        """A graph of ops(out) into out = out_s[:N], captured on a side stream. The warm-up before it (lazy
        initialization must not happen during capture) writes into a scratch output: the wave itself runs at the
        replay that follows. capture_begin, not torch.cuda.graph: that one syncs the device and collects garbage."""
        stream, dev = self.capture_stream, self.slots.device
        stream.wait_stream(torch.cuda.current_stream(dev))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            ops(torch.zeros_like(self.out_s[:N]))
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                ops(self.out_s[:N])
            finally:
                graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(stream)
        return graph


def _padded_segment(seg: np.ndarray, P: int, G: int, pos: np.ndarray, parts: list, w_host: np.ndarray) -> None:
    """A static wave's meta segment [P entries | G offsets | P weights]: the entries of parts[i] (group pos[i])
    padded to P by repeating the last entry with weight 0 (one graph per shape, not per entry count), the
    cumulative entries per group (the pads count in the last), the weights."""
    ent = [int(i) for e in parts for i in e]
    M = len(ent)
    seg[:P] = ent + [ent[-1]] * (P - M)
    counts = seg[P:P + G]
    counts[:] = 0
    counts[pos] = [len(e) for e in parts]
    counts[pos[-1]] += P - M
    np.cumsum(counts, out=counts)
    wv = seg[P + G:2 * P + G].view(np.float32)
    wv[:M] = w_host[ent]
    wv[M:] = 0.0
