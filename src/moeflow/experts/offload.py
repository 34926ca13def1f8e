"""Experts split between the GPU and the host (Fiddler and beyond).

The GPU holds S expert slots: resident experts (the most popular, for the whole run) and a cache of copied
ones. Per layer and step, every selected expert found in a slot runs on the GPU at once; the policy plans the
missing ones: computed on the CPU (the activations cross PCIe), copied in (the weights cross PCIe, on their
own stream, from pinned memory), or split by rows between both. The CPU, the copy engine and the GPU work at
the same time. With the CPU as the fast device too (no GPU), the same code runs synchronously: CI tests it.

Legend: N = tokens, K = experts per token, H = hidden, I = intermediate rows, S = slots, (l, e) = expert key
with l the MoE layer's row in the store.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from moeflow.engine.budget import pass_entries_per_token
from moeflow.experts.cpu import CpuCall, CpuExperts, Job, default_threads
from moeflow.experts.local import block_ffn
from moeflow.experts.store import ExpertStore, HostBuffers, expert_rows
from moeflow.experts.waves import Wave, Waves
from moeflow.perf.costs import ExpertCosts, measure_costs
from moeflow.policy.base import OffloadPolicy, SlotSplit
from moeflow.policy.eviction import EVICTION

Key = tuple[int, int]
SCALE_SMOOTHING = 0.2      # weight of the newest layer in the CPU- and copy-speed corrections
SCALE_RANGE = (0.25, 4.0)  # one odd layer (a page fault, a preempted thread) moves them at most this far
# pause iterations the thread that drives the GPU spins waiting for the CPU's share before it sleeps (it has a
# core of its own; a sleeping wait wakes tens of microseconds late, every layer)
WAIT_SPIN = 1 << 18
BULK_ENTRIES = 64  # routing entries (N x K) from which a layer groups them with numpy (plain Python below)
BIG_JOB = 16  # tokens: from about here a CPU expert is compute-bound (AMX), below it reads its weights; the
              # CPU correction is kept apart for the two, so decode's does not steer prefill's plan


def regime(tokens: int) -> int:
    """Which CPU correction a layer's CPU work takes: 0 below BIG_JOB tokens for its largest expert, else 1."""
    return int(tokens >= BIG_JOB)


def smoothed(scale: float, observed: float, predicted: float) -> float:
    """The correction `scale` moved towards observed / predicted (clamped to SCALE_RANGE)."""
    ratio = min(max(observed / max(predicted, 1e-9), SCALE_RANGE[0]), SCALE_RANGE[1])
    return scale + SCALE_SMOOTHING * (ratio - scale)


@dataclass
class OffloadStats:
    lookups: int = 0          # experts selected, counted once per layer call
    hits: int = 0             # of those, found on the GPU (resident or cached)
    resident_hits: int = 0
    cpu_experts: float = 0.0  # experts computed on the CPU (a split one counts its fraction)
    copied_experts: float = 0.0
    bytes_h2d: int = 0        # expert weights copied host -> GPU
    miss_bytes: int = 0       # weights of the experts that were not on the GPU when needed
    # where the host's time goes (seconds): in the backend in all, waiting for the GPU at the per-layer sync,
    # planning (sync to CPU work handed over), launching the GPU's share (copies and compute), the CPU worker
    # busy on experts (of which inside the native kernel), and waiting for that worker once the GPU's share is
    # launched; cpu_start: from handing the CPU's share over to the worker starting on it (the GIL, a wake-up)
    backend_s: float = 0.0
    sync_s: float = 0.0
    plan_s: float = 0.0
    launch_s: float = 0.0
    cpu_s: float = 0.0
    cpu_kernel_s: float = 0.0
    cpu_wait_s: float = 0.0
    cpu_start_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate}


class PromptShape:
    """How a prompt's routing entries spread over the experts: per layer of a step of several tokens, the
    experts' token counts from the most used down, averaged over the layers recorded. The timing model spreads
    a prompt's tokens this way (a policy that sends an expert with few tokens to the CPU sees them)."""

    def __init__(self, experts: int):
        self.sums, self.layers = [0.0] * experts, 0

    def reset(self) -> None:
        self.sums, self.layers = [0.0] * len(self.sums), 0

    def add(self, counts: list[int]) -> None:
        for i, n in enumerate(sorted(counts, reverse=True)):
            self.sums[i] += n
        self.layers += 1

    def mean(self) -> list[float]:
        return [s / self.layers for s in self.sums] if self.layers else []


class SlotCache:
    """Which expert each GPU slot holds. Resident slots never change (unless the split is adaptive); cache
    slots follow the eviction policy, in one shared group or one group per layer.

    Adaptive: every selected expert counts as used, every held expert is a candidate, and a copied expert
    takes the lowest-ranked one's slot when the eviction policy admits it (else it goes to a scratch slot).
    prior: (l, e) -> uses per step from a popularity profile, the eviction policy's starting point."""

    def __init__(self, resident: list[Key], split: SlotSplit, layers: int, eviction: str = "lru",
                 prior: dict[Key, float] | None = None):
        if split.adaptive and split.per_layer:
            raise ValueError("an adaptive split shares its scratch slots: per_layer must be off")
        self.where: dict[Key, int] = {k: i for i, k in enumerate(resident)}
        self.adaptive = split.adaptive
        self.resident = set(resident)  # adaptive: those of them still held
        cache = list(range(len(resident), len(resident) + split.cache))
        self.groups = ({g: cache[g::layers] for g in range(layers)} if split.per_layer else {None: cache})
        self.holder: dict[int, Key | None] = dict.fromkeys(cache)
        self.per_layer = split.per_layer
        self.learning = True  # see begin()
        self.eviction = EVICTION[eviction]()
        for key, rate in (prior or {}).items():
            self.eviction.seed(key, rate)
        if self.adaptive:
            for key in resident:
                self.eviction.hold(key)

    def begin(self, layer: int, broad: bool) -> None:
        """A layer of a step starts; layer 0 ticks the eviction policy's clock. broad: the step's tokens can
        select every expert (a prompt): an adaptive split neither counts its uses nor keeps its copies, since
        such a step says nothing about which experts to keep, and its copies would take the slots of experts
        the same step needs in later layers (measured: Mixtral's prefill hit 6% instead of 23%)."""
        if layer == 0:
            self.eviction.tick()
        self.learning = not (self.adaptive and broad)

    def lookup(self, key: Key) -> int | None:
        slot = self.where.get(key)
        if (self.adaptive and self.learning) or (slot is not None and key not in self.resident):
            self.eviction.touch(key)
        return slot

    def keepers(self, keys: list[Key], protect: set[Key]) -> set[Key]:
        """Those of `keys` (not held) that, copied in whole now, would be kept in the slot of the held expert
        ranked lowest outside `protect` (an adaptive split that is learning)."""
        if not (self.adaptive and self.learning and self.where):
            return set()
        victim = self.eviction.victim(self.where.keys(), protect)
        if victim is None or victim in protect:
            return set()
        return {k for k in keys if k not in self.where and self.eviction.admits(k, victim)}

    def capacity(self, layer: int) -> int:
        return len(self.groups[layer if self.per_layer else None])

    def take(self, key: Key, protect: set[Key], keep: bool, busy: set[int] = frozenset()) -> int:
        """A slot for `key` (about to be copied in), evicting if the group is full. Free slots not `busy`
        (in use in this layer) come first."""
        if self.adaptive:
            return self._take_adaptive(key, protect, keep and self.learning, busy)
        slots = self.groups[key[0] if self.per_layer else None]
        free = sorted((s for s in slots if self.holder[s] is None), key=lambda s: s in busy)
        if free:
            slot = free[0]
        else:
            victim = self.eviction.victim([self.holder[s] for s in slots], protect)
            slot = self.where.pop(victim)
            self.eviction.remove(victim)
        self.holder[slot] = key if keep else None
        if keep:
            self.where[key] = slot
            self.eviction.hold(key)
            self.eviction.touch(key)
        return slot

    def _take_adaptive(self, key: Key, protect: set[Key], keep: bool, busy: set[int]) -> int:
        victim = self.eviction.victim(self.where.keys(), protect) if keep and self.where else None
        if victim is not None and victim not in protect and self.eviction.admits(key, victim):
            slot = self.where.pop(victim)
            self.eviction.remove(victim)
            self.resident.discard(victim)
            self.where[key] = slot
            self.eviction.hold(key)
            return slot
        return sorted(self.groups[None], key=lambda s: s in busy)[0]  # scratch


class OffloadedExperts:
    """The expert backend of the latency regime."""

    graph_safe = False  # it syncs with the host every layer to plan

    def __init__(self, host: ExpertStore, device: torch.device, policy: OffloadPolicy, split: SlotSplit,
                 resident: list[Key], costs: ExpertCosts | None = None, eviction: str | None = None,
                 graphs: bool = True, prior: dict[Key, float] | None = None):
        self.host, self.device, self.policy, self.split = host, torch.device(device), policy, split
        cfg = host.cfg
        self.inter, self.hidden, self.E = cfg.expert_intermediate_size, cfg.hidden_size, cfg.num_experts
        n_slots = len(resident) + split.cache
        # zeros, not empty: a split expert's slot keeps stale rows that must be finite (see Waves.run)
        self.slots = torch.zeros(n_slots, cfg.expert_numel, dtype=host.data.dtype, device=self.device)  # [S, 3IH]
        self.waves = Waves(self.slots, self.inter, graphs, pass_entries_per_token(cfg, host.data.element_size()))
        self.cache = SlotCache(resident, split, len(host.layers), eviction or policy.eviction, prior)
        for i, (l, e) in enumerate(resident):
            self.slots[i].copy_(host.data[l, e], non_blocking=True)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # a spinning wait (the driver's, without the GIL): this thread has a core of its own (the CPU kernel
        # leaves one), and a sleeping wait wakes tens of microseconds late, every layer
        self._arrived = torch.cuda.Event() if self.cuda else None
        # pinned host buffers, reused by every layer: the routing and activations in, the CPU's share out
        self._host = HostBuffers(pinned=self.cuda)
        self._cpu_out = ZeroedRows(self.hidden, pinned=self.cuda)
        # The CPU kernel's own threads; one core stays with the thread that drives the GPU.
        self.cpu = CpuExperts(threads=default_threads(reserve=1 if self.cuda else 0))
        self.stats = OffloadStats()
        self.pending: dict[int, torch.cuda.Event | None] = {}  # slot -> its prefetch's copy (policy fmoe)
        self.prompt_shape = PromptShape(self.E)  # the bench resets it before the prompt it times
        self.costs = costs
        # observed / predicted CPU and copy times, smoothed: their speeds while both draw on host memory and
        # beside the GPU driver thread are what the plan needs, and they differ from measurements taken alone
        self.cpu_scales, self.copy_scale, self.calibrate = [1.0, 1.0], 1.0, True  # CPU: by regime()
        self._copy_timing: tuple | None = None  # (start, end events, predicted s) of the last layer's copies
        if costs is None and policy.needs_costs:
            self.costs = self.measure_costs()

    @property
    def cpu_scale(self) -> float:
        """The CPU correction of decode-sized work (regime 0)."""
        return self.cpu_scales[0]

    # -- costs ---------------------------------------------------------------------------------------
    def measure_costs(self) -> ExpertCosts:
        L, E = self.host.data.shape[:2]
        scratch = torch.empty_like(self.slots[0]) if not self.split.cache else self.slots[-1]
        many = (4, self.cpu.many(4, self.host.data[0])) if E >= 8 else None  # layer 0's experts, 4 at a time
        costs = measure_costs(lambda i: self.host.data[i // E % L, i % E], self.inter, self.hidden, min(L * E, 16),
                              scratch, self.cpu.expert, block_ffn(self.inter), copy_stream=self.copy_stream,
                              cpu_many=many)
        return replace(costs, cpu_call_s=self.cpu.handoff_s())

    # -- one layer -----------------------------------------------------------------------------------
    def pack(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """What a layer's call needs on the host, in one fp32 vector: [x (policies that may use the CPU), the
        routing weights, the expert ids (exact in fp32)]. A decode graph computes it in its piece before the
        layer (engine/cuda_graph.py), so the call makes one transfer where it made a cast and three."""
        parts = [topk_weights.float().reshape(-1), topk_ids.float().reshape(-1)]
        return torch.cat([x.float().reshape(-1)] + parts if self.policy.uses_cpu else parts)

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 packed: torch.Tensor | None = None, dest: torch.Tensor | None = None) -> torch.Tensor:
        """packed: pack(x, topk_ids, topk_weights), where the caller has it; dest: where to write the result
        ([N, H], x's dtype; else a new tensor)."""
        N, K = topk_ids.shape
        l, I = self.host.slot[layer], self.inter
        s, t_in = self.stats, time.perf_counter()
        # One sync per layer: the routing (and the activations, for the CPU) come to the host; x in fp32,
        # converted on the GPU: the CPU kernel reads fp32 activations.
        if packed is not None:
            buf = self._to_host("packed", packed)
            nx = N * self.hidden if self.policy.uses_cpu else 0
            x_h = buf[:nx].view(N, self.hidden) if nx else None
            w_h, ids_h = buf[nx:nx + N * K], buf[nx + N * K:]  # ids as fp32: made ints once read
        else:
            ids_h, w_h = self._to_host("ids", topk_ids), self._to_host("w", topk_weights)
            x_h = self._to_host("x", x.float()) if self.policy.uses_cpu else None
        if self.cuda:
            self._arrived.record()
            self._arrived.synchronize()
        s_sync = time.perf_counter() - t_in
        s.sync_s += s_sync
        self.cache.begin(l, broad=N * K >= self.E)
        entries = group_entries(ids_h)  # expert -> its flat (token, k) indices, in order
        experts = sorted(entries)
        if N > 1:
            self.prompt_shape.add([len(v) for v in entries.values()])
        found = {e: self.cache.lookup((l, e)) for e in experts}
        misses = {e: len(entries[e]) for e in experts if found[e] is None}
        costs = (self.costs.scaled(self.cpu_scales[regime(max(misses.values()))], self.copy_scale)
                 if self.costs is not None and misses else None)  # a layer with no miss plans nothing
        rows = {}
        if misses:  # keep: those a whole copy of which the cache would keep (an adaptive split)
            held = {(l, e) for e in experts if found[e] is not None}
            keep = {e for _, e in self.cache.keepers([(l, e) for e in misses], held)}
            rows = self.policy.plan(misses, costs, I, self.cache.capacity(l), keep)

        # The CPU's share starts first: it is usually the longest.
        cpu_jobs = [(e, r, entries[e]) for e, r in rows.items() if r > 0]
        call = self._cpu_part(l, x_h, w_h.flatten(), K, cpu_jobs) if cpu_jobs else None
        t_plan = time.perf_counter()
        s.plan_s += t_plan - t_in - s_sync
        self._observe_copies()  # the last layer's copy time, read once the CPU is under way (its next plan uses it)

        # Copies on the copy stream; the GPU computes the experts already there at once, then the copied ones
        # once they land, each group of experts in one pass (waves). A slot reused within this layer (more
        # copies than slots) first gets the wave holding it computed.
        out = self.waves.begin(x, topk_weights)  # [N, H] fp32
        here: Wave = {found[e]: (entries[e], self.pending.pop(found[e], None)) for e in experts
                      if found[e] is not None}
        protect = {(l, e) for e in experts if found[e] is not None}
        copies = {e: r for e, r in rows.items() if r < I}
        timing = self._start_copy_timing(copies, costs)
        wave: Wave = {}
        for e, r in copies.items():
            key = (l, e)
            slot = self.cache.take(key, protect, keep=r == 0 and self.split.keep_copies, busy=set(wave) | set(here))
            if slot in here:  # the layer's cache group is full of its own experts
                self.waves.run(here)
                here = {}
            if slot in wave:
                self.waves.run(wave)
                wave = {}
            protect.add(key)
            wave[slot] = (entries[e], self._copy_in(slot, l, e, r))
            self.stats.bytes_h2d += (I - r) * 3 * self.hidden * self.slots.element_size()
        if timing is not None:
            timing[1].record(self.copy_stream)
            self._copy_timing = timing
        if here:
            self.waves.run(here)
        if wave:
            self.waves.run(wave)
        self.policy.after_layer(self, l, ids_h.reshape(N, K), w_h.reshape(N, K))  # prefetches (fmoe)
        t = time.perf_counter()
        s.launch_s += t - t_plan
        cpu_out = None
        if call is not None:
            cpu_out = call.result().to(self.device, non_blocking=True)
            s.cpu_wait_s += time.perf_counter() - t
            self._cpu_done(call, cpu_jobs, beside_copies=bool(copies))

        s.lookups += len(experts)
        s.hits += len(experts) - len(misses)
        s.resident_hits += sum(1 for e in experts if (l, e) in self.cache.resident)
        s.cpu_experts += sum(r / I for r in rows.values())
        s.copied_experts += sum((I - r) / I for r in rows.values())
        s.miss_bytes += len(misses) * self.host.expert_bytes
        if dest is not None:  # one launch where a sum, a cast and the caller's copy were three
            result = dest.copy_(out) if cpu_out is None else torch.add(out, cpu_out, out=dest)
        else:  # a new tensor: out may be the wave graphs' buffer, which the next layer reuses
            result = (out if cpu_out is None else out.add_(cpu_out)).to(x.dtype, copy=True)
        s.backend_s += time.perf_counter() - t_in
        return result

    def _copy_in(self, slot: int, l: int, e: int, r: int) -> torch.cuda.Event | None:
        """Rows r:I of expert (l, e) into `slot`: one transfer for a whole expert, three for a part (whose gate
        rows 0:r are zeroed, see Waves.run)."""
        src, dst = self.host.data[l, e], self.slots[slot]
        ctx = torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext()
        with ctx:
            if self.cuda and slot in self.waves.slot_free:
                self.copy_stream.wait_event(self.waves.slot_free[slot])
            if r == 0:
                dst.copy_(src, non_blocking=True)
            else:
                I = self.inter
                for d, s in zip(expert_rows(dst, I, r, I), expert_rows(src, I, r, I)):
                    d.copy_(s, non_blocking=True)
                expert_rows(dst, I, 0, r)[0].zero_()
            return self.copy_stream.record_event() if self.cuda else None

    def _cpu_done(self, call: CpuCall, jobs, beside_copies: bool) -> None:
        """The CPU's share of a layer has returned: its times, and the correction of the CPU's costs."""
        self.stats.cpu_start_s += call.start_s
        self.stats.cpu_s += call.busy_s
        self.stats.cpu_kernel_s += self.cpu.kernel_s
        if self.costs is not None and self.calibrate:
            predicted = self.costs.cpu_work([(len(ent), r / self.inter) for _, r, ent in jobs], beside_copies)
            k = regime(max(len(ent) for _, _, ent in jobs))
            self.cpu_scales[k] = smoothed(self.cpu_scales[k], call.busy_s, predicted)

    def _cpu_part(self, l: int, x: torch.Tensor, w: torch.Tensor, K: int, jobs) -> CpuCall:
        """Rows 0:r of each job's expert on the CPU, weighted and summed into [N, H] fp32 (pinned when a GPU
        waits), handed over. jobs: (expert, r, flat (token, k) indices: a list, or numpy from group_entries);
        w: the routing weights [N * K] fp32, flat, on the host. Plain Python or numpy up to the kernel: each
        PyTorch op here would cost tens of microseconds beside the GPU driver thread."""
        if isinstance(jobs[0][2], np.ndarray):
            wf = w.numpy()
            cpu_jobs = [Job(e, ent // K, wf[ent], 0, r) for e, r, ent in jobs]
            rows = np.concatenate([j.tok for j in cpu_jobs])
        else:
            wl = w.tolist()
            cpu_jobs = [Job(e, [i // K for i in ent], [wl[i] for i in ent], 0, r) for e, r, ent in jobs]
            rows = np.array([t for j in cpu_jobs for t in j.tok], dtype=np.int64)
        out = self._cpu_out.take(x.shape[0], rows)
        return self.cpu.submit(self.host.data[l], x, cpu_jobs, out, spin=WAIT_SPIN if self.cuda else 0)

    def _to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t on the host: itself without a GPU, else copied (asynchronously) into its reused pinned buffer. A
        layer's buffers are free again at the next layer: by then its copies out of them are done and its CPU
        work returned."""
        if not self.cuda:
            return t
        buf = self._host.get(name, tuple(t.shape), t.dtype)
        buf.copy_(t, non_blocking=True)
        return buf

    def close(self) -> None:
        self.cpu.close()

    def _start_copy_timing(self, copies: dict[int, int], costs: ExpertCosts | None) -> tuple | None:
        """Events around this layer's copies on the copy stream, read at the next layer's sync (by then they
        have completed, so reading them costs no wait)."""
        if not (self.cuda and copies and costs is not None and self.calibrate):
            return None
        predicted = sum(costs.copy((self.inter - r) / self.inter) for r in copies.values()) / self.copy_scale
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.copy_stream)
        return start, end, predicted

    def _observe_copies(self) -> None:
        if self._copy_timing is None:
            return
        start, end, predicted = self._copy_timing
        self._copy_timing = None
        if end.query():
            self.copy_scale = smoothed(self.copy_scale, start.elapsed_time(end) / 1e3, predicted)


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
