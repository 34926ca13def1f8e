"""Experts split between the GPU and the host (Fiddler and beyond).

The GPU holds S expert slots: resident experts (the most popular, for the whole run) and a cache of copied
ones. Per layer and step, every selected expert found in a slot runs on the GPU at once; the policy plans the
missing ones: computed on the CPU (the activations cross PCIe), copied in (the weights cross PCIe, on their
own stream, from pinned memory), or split by rows between both. The CPU, the copy engine and the GPU work at
the same time. With the CPU as the fast device too (no GPU), the same code runs synchronously: CI tests it.
A layer's call, in phases: to the host (one sync), plan, start the CPU's share, copies and GPU waves, the
policy's prefetch, join.

Legend: N = tokens, K = experts per token, H = hidden, I = intermediate rows, S = slots, (l, e) = expert key
with l the MoE layer's row in the store.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

from moeflow.engine.budget import pass_entries_per_token
from moeflow.experts.base import ExpertBackend
from moeflow.experts.calibration import BIG_JOB, CostCorrection, regime, smoothed  # noqa: F401
from moeflow.experts.cpu import CpuCall, CpuExperts, Job, cpu_threads
from moeflow.experts.ffn import block_ffn
from moeflow.experts.host import BULK_ENTRIES, HostStaging, ZeroedRows, group_entries  # noqa: F401
from moeflow.experts.layer_plan import LayerPlan, OffloadStats  # noqa: F401
from moeflow.experts.store import ExpertStore
from moeflow.experts.waves import Wave, Waves
from moeflow.perf.costs import ExpertCosts, measure_costs
from moeflow.perf.prompt_shape import PromptShape
from moeflow.policy.base import OffloadPolicy, SlotSplit
from moeflow.policy.slot_cache import SlotCache

Key = tuple[int, int]
# pause iterations the thread that drives the GPU spins waiting for the CPU's share before it sleeps (it has a
# core of its own; a sleeping wait wakes tens of microseconds late, every layer)
WAIT_SPIN = 1 << 18


class OffloadedExperts(ExpertBackend):
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
        self.slots = torch.zeros(n_slots, host.data.shape[-1], dtype=host.data.dtype, device=self.device)  # [S, 3IH]
        self.waves = Waves(self.slots, self.inter, graphs, pass_entries_per_token(cfg, host.dtype.itemsize),
                           fmt=host.fmt)
        self.cache = SlotCache(resident, split, len(host.layers), eviction or policy.eviction, prior)
        for i, (l, e) in enumerate(resident):
            self.slots[i].copy_(host.data[l, e], non_blocking=True)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging = HostStaging(self.hidden, self.cuda)
        self.cpu = CpuExperts(threads=cpu_threads(driver=self.cuda), fmt=host.fmt)
        self.stats = OffloadStats()
        self.prompt_shape = PromptShape(self.E)  # the bench resets it before the prompt it times
        self.costs = costs
        self.correction = CostCorrection(self.inter)
        self._landing: dict[int, torch.cuda.Event | None] = {}  # slot -> arrival of a copy made ahead
        self._ahead: set[Key] = set()  # experts copied ahead whose layer has not come since
        self._ahead_event: torch.cuda.Event | None = None  # the arrival of the last batch copied ahead
        # the layer being launched: the slots its waves read; its copies in whole experts (a policy's prefetch
        # reads it: the copy engine's time left in the layer)
        self._layer_slots: set[int] = set()
        self.layer_copied = 0.0
        self._cpu_dev = torch.empty(0, self.hidden, device=self.device)  # the CPU share's output on the device
        if costs is None and policy.needs_costs:
            self.costs = self.measure_costs()

    # -- the corrections, as attributes (benchmarks and tests read and set them) ---------------------
    @property
    def cpu_scale(self) -> float:
        """The CPU correction of decode-sized work (regime 0)."""
        return self.correction.cpu_scales[0]

    @property
    def cpu_scales(self) -> list[float]:
        return self.correction.cpu_scales

    @cpu_scales.setter
    def cpu_scales(self, v: list[float]) -> None:
        self.correction.cpu_scales = list(v)

    @property
    def copy_scale(self) -> float:
        return self.correction.copy_scale

    @property
    def calibrate(self) -> bool:
        return self.correction.enabled

    @calibrate.setter
    def calibrate(self, on: bool) -> None:
        self.correction.enabled = on

    # -- costs ---------------------------------------------------------------------------------------
    def measure_costs(self) -> ExpertCosts:
        L, E = self.host.data.shape[:2]
        scratch = torch.empty_like(self.slots[0]) if not self.split.cache else self.slots[-1]
        many = (4, self.cpu.many(4, self.host.data[0])) if E >= 8 else None  # layer 0's experts, 4 at a time
        costs = measure_costs(lambda i: self.host.data[i // E % L, i % E], self.inter, self.hidden, min(L * E, 16),
                              scratch, self.cpu.expert, block_ffn(self.inter, self.host.fmt),
                              copy_stream=self.copy_stream, cpu_many=many, dtype=self.host.dtype)
        return replace(costs, cpu_call_s=self.cpu.handoff_s())

    # -- one layer -----------------------------------------------------------------------------------
    def pack(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """What a layer's call needs on the host, in one fp32 vector: [x (policies that may use the CPU), the
        routing weights, the expert ids (exact in fp32)]. A decode graph computes it in its piece before the
        layer (engine/cuda_graph.py), so the call makes one transfer where it made a cast and three."""
        parts = [topk_weights.float().reshape(-1), topk_ids.float().reshape(-1)]
        return torch.cat([x.float().reshape(-1)] + parts if self.policy.uses_cpu else parts)

    def run_into(self, layer, x, topk_ids, topk_weights, packed, dest):
        return self(layer, x, topk_ids, topk_weights, packed, dest)

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 packed: torch.Tensor | None = None, dest: torch.Tensor | None = None) -> torch.Tensor:
        """packed: pack(x, topk_ids, topk_weights), where the caller has it; dest: where to write the result
        ([N, H], x's dtype; else a new tensor)."""
        s, t_in = self.stats, time.perf_counter()
        st = self.staging.fetch(x, topk_ids, topk_weights, packed, self.policy.uses_cpu)
        t_sync = time.perf_counter()
        self.correction.observe_copies()  # the last layer's, done by now (its GPU work synced above)
        plan = self._plan(self.host.slot[layer], st.ids_np, topk_ids.numel())
        t_plan = time.perf_counter()
        K = topk_ids.shape[1]
        self.waves.begin(x, st.w_np, K)
        here, wave = self._copies(plan)  # the copy engine fed first: a copy moves from the moment it is issued
        self._layer_slots = here.keys() | wave.keys()
        jobs = plan.cpu_jobs
        call = self._cpu_part(plan.layer, st.x, st.w_np, K, jobs) if jobs else None
        for w in (here, wave):  # the experts already held first: they need no copy
            if w:
                self.waves.run(w)
        t_prefetch = time.perf_counter()
        if self.policy.prefetches():
            shape = topk_ids.shape  # numpy views: no PyTorch op in the hook
            self.policy.prefetch(plan.layer, st.ids_np.reshape(shape), st.w_np.reshape(shape), self)
        t_launch = time.perf_counter()
        s.prefetch_s += t_launch - t_prefetch
        result = self._join(plan, call, x, dest)
        s.sync_s += t_sync - t_in
        s.plan_s += t_plan - t_sync
        s.launch_s += t_launch - t_plan
        s.backend_s += time.perf_counter() - t_in
        return result

    def _plan(self, l: int, ids_h: np.ndarray, entries_n: int) -> LayerPlan:
        """Where each selected expert of MoE row l is, and the policy's plan for the missing ones.
        ids_h: the layer's expert ids, flat; entries_n: its routing entries (N x K)."""
        self.cache.begin(l, broad=entries_n >= self.E)
        entries = group_entries(ids_h)  # expert -> its flat (token, k) indices, in order
        if entries_n > self.host.cfg.num_experts_per_tok:  # a step of several tokens
            self.prompt_shape.add([len(v) for v in entries.values()])
        lookup = self.cache.lookup
        plan = LayerPlan(l, self.inter, entries, {e: lookup((l, e)) for e in sorted(entries)})
        if self._ahead:
            self._count_ahead(l, plan)
        held = {(l, e) for e in plan.held}
        if self.cache.staged:  # guesses of this layer: spent, or kept where used and admitted
            self.cache.end_layer(l, used=held, protect={(l, e) for e in plan.found})
        misses = plan.misses
        plan.costs = self.correction.scaled(self.costs, misses)  # a layer with no miss plans nothing
        if misses:  # keep: those a whole copy of which the cache would keep (an adaptive split)
            keep = {e for _, e in self.cache.keepers([(l, e) for e in misses], held)}
            plan.rows = self.policy.plan(misses, plan.costs, self.inter, self.cache.capacity(l), keep)
            self._probe(plan)
        return plan

    def _probe(self, plan: LayerPlan) -> None:
        """Half of a missing expert (its fewest tokens) on the CPU where the correction asks for a probe: a plan
        that keeps the CPU idle never tests the CPU estimate behind it."""
        if not (self.policy.uses_cpu and plan.costs is not None) or any(plan.rows.values()):
            return
        if self.correction.probe_due(max(plan.misses.values())):
            e = min(plan.rows, key=plan.misses.__getitem__)
            plan.rows[e], plan.probe = self.inter // 2, True

    def _copies(self, plan: LayerPlan) -> tuple[Wave, Wave]:
        """The layer's copies issued on the copy stream, in one stream switch and with one event per batch; a slot
        reused within the layer (more copies than slots) first gets the wave holding it computed. Returns the
        waves left to run: the experts already held (after any prefetched copy of theirs lands), and the copied
        ones (after their copies land)."""
        l = plan.layer
        here: Wave = {s: (plan.entries[e], self._landing.pop(s, None)) for e, s in plan.held.items()}
        protect = {(l, e) for e in plan.held}
        copies = plan.copies
        self.layer_copied = sum(self.inter - r for r in copies.values()) / self.inter
        self.correction.start_copies(self.copy_stream, copies, plan.costs)
        wave: Wave = {}
        pending: dict[int, tuple[int, int]] = {}  # slot -> (expert, rows left on the CPU), not issued yet
        for e, r in copies.items():
            slot = self.cache.take((l, e), protect, keep=r == 0 and self.split.keep_copies,
                                   busy=set(wave) | set(here) | set(pending))
            if slot in here:  # the layer's cache group is full of its own experts
                self.waves.run(here)
                here = {}
            if slot in wave or slot in pending:
                wave |= self._issue(l, pending, plan.entries)
                pending = {}
                self.waves.run(wave)
                wave = {}
            protect.add((l, e))
            pending[slot] = (e, r)
            self.stats.bytes_h2d += (self.inter - r) * self.host.fmt.row_bytes
        wave |= self._issue(l, pending, plan.entries)
        self.correction.end_copies(self.copy_stream)
        return here, wave

    def _join(self, plan: LayerPlan, call: CpuCall | None, x: torch.Tensor, dest: torch.Tensor | None) -> torch.Tensor:
        """The CPU's share waited for and added to the GPU's; the layer's figures counted."""
        cpu_out = None
        if call is not None:
            t = time.perf_counter()
            cpu_out = self._to_device(call.result())
            self.stats.cpu_wait_s += time.perf_counter() - t
            self._cpu_done(call, plan.cpu_jobs, bool(plan.copies), plan.probe)
        self._count(plan)
        out = self.waves.result()  # None: no wave ran (every expert on the CPU)
        if out is None and cpu_out is None:  # nothing selected (no routing entries)
            return dest.zero_() if dest is not None else torch.zeros_like(x)
        if dest is not None:  # one launch where a sum, a cast and the caller's copy were three
            if out is None or cpu_out is None:
                return dest.copy_(cpu_out if out is None else out)
            return torch.add(out, cpu_out, out=dest)
        # a new tensor: out may be the wave graphs' buffer, and cpu_out the CPU share's, which the next layer reuses
        if out is None or cpu_out is None:
            return (cpu_out if out is None else out).to(x.dtype, copy=True)
        return out.add_(cpu_out).to(x.dtype, copy=True)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """t [N, H] fp32 (pinned with a GPU) into a reused device buffer (no allocation per layer)."""
        if not self.cuda:
            return t
        if t.shape[0] > self._cpu_dev.shape[0]:
            self._cpu_dev = torch.empty(t.shape[0], self.hidden, device=self.device)
        return self._cpu_dev[:t.shape[0]].copy_(t, non_blocking=True)

    def _count(self, plan: LayerPlan) -> None:
        s, I, l = self.stats, self.inter, plan.layer
        s.lookups += len(plan.found)
        s.hits += len(plan.held)
        s.resident_hits += sum(1 for e in plan.found if (l, e) in self.cache.resident)
        s.cpu_experts += sum(r / I for r in plan.rows.values())
        s.copied_experts += sum((I - r) / I for r in plan.rows.values())
        s.miss_bytes += (len(plan.found) - len(plan.held)) * self.host.expert_bytes

    # -- the policy's prefetch -------------------------------------------------------------------------
    def _count_ahead(self, l: int, plan: LayerPlan) -> None:
        """The experts of MoE row l copied ahead, now that the layer has come: used if selected and still held."""
        mine = {k for k in self._ahead if k[0] == l}
        if not mine:
            return
        used = sum(1 for k in mine if k[1] in plan.held)
        self.stats.prefetch_used += used
        self.stats.prefetch_wasted += len(mine) - used
        self._ahead -= mine

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.host.layers), self.E

    def holds(self, key: Key) -> bool:
        return self.cache.holds(key)

    def copy_s(self) -> float:
        return self.costs.copy() if self.costs is not None else 0.0

    def miss_s(self) -> float:
        """Seconds a lone one-token miss costs a layer by its cheaper path (the CPU's with its call, or a copy
        and the GPU's), as corrected so far; 0 where costs are unknown."""
        c = self.correction.scaled(self.costs, {0: 1})
        return 0.0 if c is None else min(c.cpu_call() + c.cpu_each(1), c.copy() + c.gpu(1))

    def copy_ahead(self, key: Key, protect=()) -> bool:
        """Expert key = (l, e) copied in whole, on the copy stream, for a later layer or step (which waits for it
        to land): into the cache slot the eviction policy gives it, or with an adaptive split into a free
        scratch slot, findable until its layer comes. False where it is held already, or the cache would not
        keep it (a split whose copies are scratch, no free scratch slot, a cache that does not admit it).
        Called from a policy's prefetch(), after the layer's own copies and GPU work are issued."""
        if self.cache.holds(key) or not self.split.keep_copies or self.cache.capacity(key[0]) == 0:
            return False
        if self.cache.adaptive and not self.cache.scratch_keeps:  # scratch_keeps (fmoe): take() keeps it
            slot = self.cache.stage(key, avoid=self._layer_slots)
            if slot is None:
                return False
        else:
            slot = self.cache.take(key, protect=set(protect) - {key}, keep=True)
            if self.cache.where.get(key) != slot:
                return False
        self._landing[slot] = self._copy_in(slot, key[0], key[1], 0)
        self._issued_ahead([key])
        return True

    def copy_ahead_many(self, keys: list[Key], protect: set[Key]) -> int:
        """fmoe's batch: experts keys = [(l, e)] (nearest layer first) copied in whole into the slots the cache's
        scratch pool gives them (SlotCache.prefetch_slots), in one stream switch with one event per layer.
        Returns how many were issued."""
        if not self.cache.scratch_keeps:
            return sum(self.copy_ahead(k, protect) for k in keys)
        placed = self.cache.prefetch_slots(keys, protect, self._layer_slots)
        if not placed:
            return 0
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            group: list[int] = []
            for i, ((l, e), slot) in enumerate(placed):
                self._copy(slot, l, e, 0)
                group.append(slot)
                if i + 1 == len(placed) or placed[i + 1][0][0] != l:  # the layer's last: one event for its slots
                    self._ahead_event = self.copy_stream.record_event() if self.cuda else None
                    self._landing.update(dict.fromkeys(group, self._ahead_event))
                    group = []
        self._issued_ahead([k for k, _ in placed])
        return len(placed)

    def _issued_ahead(self, keys: list[Key]) -> None:
        """Whole experts copied ahead: counted, and watched until their layer comes (used or wasted)."""
        self.stats.bytes_h2d += len(keys) * self.host.expert_bytes
        self.stats.prefetched += len(keys)
        self._ahead.update(keys)

    def ahead_in_flight(self) -> bool:
        """Are the last batch's copies ahead still moving (the copy engine has had no idle time since)?"""
        ev = self._ahead_event
        if ev is not None and ev.query():
            self._ahead_event = ev = None
        return ev is not None

    # -- the CPU's share and the copies ----------------------------------------------------------------
    def _issue(self, l: int, pending: dict[int, tuple[int, int]], entries: dict) -> Wave:
        """Copies (slot -> (expert, rows r left on the CPU)) of MoE row l issued on the copy stream, in one stream
        switch; one event after them all (the wave that needs them waits for the last). Returns their wave."""
        if not pending:
            return {}
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            if self.cuda:  # the waits first: the copy timing then covers the transfers alone
                for slot in pending:
                    self.waves.wait_free(slot, self.copy_stream)
                self.correction.transfers_begin(self.copy_stream)
            for slot, (e, r) in pending.items():
                self._copy(slot, l, e, r)
            ready = self.copy_stream.record_event() if self.cuda else None
        return {slot: (entries[e], ready) for slot, (e, _) in pending.items()}

    def _copy_in(self, slot: int, l: int, e: int, r: int) -> torch.cuda.Event | None:
        """One copy (see _copy) on the copy stream; the event of its arrival."""
        with torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext():
            self._copy(slot, l, e, r)
            return self.copy_stream.record_event() if self.cuda else None

    def _copy(self, slot: int, l: int, e: int, r: int) -> None:
        """Rows r:I of expert (l, e) into `slot`, on the current stream (the copy stream), once the last wave that
        read the slot is done: one transfer for a whole expert, three for a part (whose gate rows 0:r are zeroed,
        see Waves.run)."""
        src, dst = self.host.data[l, e], self.slots[slot]
        self._landing.pop(slot, None)
        if self.cuda:
            self.waves.wait_free(slot, self.copy_stream)
        if r == 0:
            dst.copy_(src, non_blocking=True)
            return
        fmt, I = self.host.fmt, self.inter
        for d, s in zip(fmt.runs(dst, r, I), fmt.runs(src, r, I)):
            d.copy_(s, non_blocking=True)
        fmt.clear(dst, r)  # gate rows 0:r zeroed (a quantized row zeroed has scale 0; biased: experts/biased.py)

    def _cpu_done(self, call: CpuCall, jobs, beside_copies: bool, probe: bool = False) -> None:
        """The CPU's share of a layer has returned: its times, and the correction of the CPU's costs."""
        self.stats.cpu_start_s += call.start_s
        self.stats.cpu_s += call.busy_s
        self.stats.cpu_kernel_s += self.cpu.kernel_s
        self.stats.cpu_probes += probe
        self.correction.observe_cpu(self.costs, jobs, call.busy_s, beside_copies, probe)

    def _cpu_part(self, l: int, x: torch.Tensor, w: np.ndarray, K: int, jobs) -> CpuCall:
        """Rows 0:r of each job's expert on the CPU, weighted and summed into [N, H] fp32 (pinned when a GPU
        waits), handed over. jobs: (expert, r, flat (token, k) indices: a list, or numpy from group_entries);
        w: the routing weights [N * K] fp32, flat, on the host. Plain Python or numpy up to the kernel: each
        PyTorch op here would cost tens of microseconds beside the GPU driver thread."""
        if isinstance(jobs[0][2], np.ndarray):
            cpu_jobs = [Job(e, ent // K, w[ent], 0, r) for e, r, ent in jobs]
            rows = np.concatenate([j.tok for j in cpu_jobs])
        else:
            wl = w.tolist()
            cpu_jobs = [Job(e, [i // K for i in ent], [wl[i] for i in ent], 0, r) for e, r, ent in jobs]
            rows = np.array([t for j in cpu_jobs for t in j.tok], dtype=np.int64)
        out = self.staging.cpu_out.take(x.shape[0], rows)
        return self.cpu.submit(self.host.data[l], x, cpu_jobs, out, spin=WAIT_SPIN if self.cuda else 0)

    def close(self) -> None:
        self.cpu.close()
