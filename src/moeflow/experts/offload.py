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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from moeflow.experts.cpu import CpuExperts, Job, default_threads
from moeflow.experts.local import block_ffn, partial_ffn
from moeflow.experts.store import ExpertStore, expert_rows
from moeflow.perf.costs import ExpertCosts, measure_costs
from moeflow.policy.base import OffloadPolicy, SlotSplit
from moeflow.policy.eviction import EVICTION

Key = tuple[int, int]
CPU_SCALE_SMOOTHING = 0.2      # weight of the newest layer in the CPU-speed correction
CPU_SCALE_RANGE = (0.25, 4.0)  # one odd layer (a page fault, a preempted thread) moves it at most this far


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
    # the CPU worker busy on experts, and waiting for that worker once the GPU's share is launched
    backend_s: float = 0.0
    sync_s: float = 0.0
    cpu_s: float = 0.0
    cpu_wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate}


class SlotCache:
    """Which expert each GPU slot holds. Resident slots never change; cache slots follow the eviction policy,
    in one shared group or one group per layer."""

    def __init__(self, resident: list[Key], split: SlotSplit, layers: int, eviction: str = "lru"):
        self.where: dict[Key, int] = {k: i for i, k in enumerate(resident)}
        self.resident = set(resident)
        self.keep = split.keep_copies
        cache = list(range(len(resident), len(resident) + split.cache))
        self.groups = ({g: cache[g::layers] for g in range(layers)} if split.per_layer else {None: cache})
        self.holder: dict[int, Key | None] = dict.fromkeys(cache)
        self.per_layer = split.per_layer
        self.eviction = EVICTION[eviction]()

    def lookup(self, key: Key) -> int | None:
        slot = self.where.get(key)
        if slot is not None and key not in self.resident:
            self.eviction.touch(key)
        return slot

    def capacity(self, layer: int) -> int:
        return len(self.groups[layer if self.per_layer else None])

    def take(self, key: Key, protect: set[Key], keep: bool, busy: set[int] = frozenset()) -> int:
        """A slot for `key` (about to be copied in), evicting if the group is full. Free slots not `busy`
        (in use in this layer) come first."""
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
            self.eviction.touch(key)
        return slot


class OffloadedExperts:
    """The expert backend of the latency regime."""

    graph_safe = False  # it syncs with the host every layer to plan

    def __init__(self, host: ExpertStore, device: torch.device, policy: OffloadPolicy, split: SlotSplit,
                 resident: list[Key], costs: ExpertCosts | None = None, eviction: str = "lru"):
        self.host, self.device, self.policy, self.split = host, torch.device(device), policy, split
        cfg = host.cfg
        self.inter, self.hidden, self.E = cfg.expert_intermediate_size, cfg.hidden_size, cfg.num_experts
        n_slots = len(resident) + split.cache
        self.slots = torch.empty(n_slots, cfg.expert_numel, dtype=host.data.dtype, device=self.device)  # [S, 3IH]
        self.cache = SlotCache(resident, split, len(host.layers), eviction)
        for i, (l, e) in enumerate(resident):
            self.slots[i].copy_(host.data[l, e], non_blocking=True)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._arrived = torch.cuda.Event(blocking=True) if self.cuda else None
        self.slot_free: dict[int, torch.cuda.Event] = {}  # slot -> event after its last compute
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moeflow-cpu-experts")
        # The CPU kernel's own threads; one core stays with the thread that drives the GPU.
        self.cpu = CpuExperts(threads=default_threads(reserve=1 if self.cuda else 0))
        self.stats = OffloadStats()
        self.costs = costs
        # observed / predicted CPU time, smoothed: the CPU's speed beside the copies and the GPU driver thread
        # is what the plan needs, and it differs from a measurement taken alone
        self.cpu_scale, self.calibrate = 1.0, True
        if costs is None and policy.needs_costs:
            self.costs = self.measure_costs()

    # -- costs ---------------------------------------------------------------------------------------
    def measure_costs(self) -> ExpertCosts:
        L, E = self.host.data.shape[:2]
        scratch = torch.empty_like(self.slots[0]) if not self.split.cache else self.slots[-1]
        costs = measure_costs(lambda i: self.host.data[i // E % L, i % E], self.inter, self.hidden, min(L * E, 16),
                              scratch, self.cpu.expert, block_ffn(self.inter), copy_stream=self.copy_stream)
        t0 = time.perf_counter()
        for _ in range(20):
            self.pool.submit(lambda: None).result()
        call = (time.perf_counter() - t0) / 20  # handing work to the CPU thread and back
        return ExpertCosts(**(costs.as_dict() | {"cpu_call_s": call}))

    # -- one layer -----------------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        N, K = topk_ids.shape
        l, I = self.host.slot[layer], self.inter
        s, t_in = self.stats, time.perf_counter()
        # One sync per layer: the routing (and the activations, for the CPU) come to the host.
        ids_h, w_h, x_h = (t.to("cpu", non_blocking=True) for t in (topk_ids, topk_weights, x))
        if self.cuda:
            self._arrived.record()
            self._arrived.synchronize()  # a blocking wait: a spinning one would take a core from the CPU experts
        s.sync_s += time.perf_counter() - t_in
        order_h = torch.argsort(ids_h.flatten(), stable=True)                  # [N*K] grouped by expert
        counts = torch.bincount(ids_h.flatten(), minlength=self.E).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        experts = [e for e in range(self.E) if counts[e]]
        found = {e: self.cache.lookup((l, e)) for e in experts}
        misses = {e: counts[e] for e in experts if found[e] is None}
        costs = self.costs.scaled(self.cpu_scale) if self.costs is not None else None
        rows = self.policy.plan(misses, costs, I, self.cache.capacity(l)) if misses else {}

        # The CPU's share starts first: it is usually the longest.
        cpu_jobs = []
        for e, r in rows.items():
            if r > 0:
                idx = order_h[starts[e]:starts[e + 1]]
                cpu_jobs.append((e, r, idx // K, w_h.flatten()[idx]))
        future = self.pool.submit(self._timed_cpu_part, l, x_h, cpu_jobs) if cpu_jobs else None

        # Copies on the copy stream; the GPU computes the experts already there, then each copy as it lands.
        # A slot reused within this layer (more copies than slots) first gets its current expert computed.
        order = torch.argsort(topk_ids.flatten(), stable=True)                 # same grouping, on the device
        w_flat = topk_weights.flatten()
        out = torch.zeros(N, self.hidden, dtype=torch.float32, device=self.device)
        pending = {found[e]: (e, 0, None) for e in experts if found[e] is not None}  # slot -> (e, row0, ready)
        protect = {(l, e) for e in experts if found[e] is not None}
        for e, r in rows.items():
            if r == I:
                continue
            key = (l, e)
            slot = self.cache.take(key, protect, keep=r == 0 and self.split.keep_copies, busy=set(pending))
            if slot in pending:
                self._compute(out, x, order, w_flat, starts, K, slot, *pending.pop(slot))
            protect.add(key)
            pending[slot] = (e, r, self._copy_in(slot, l, e, r))
            self.stats.bytes_h2d += (I - r) * 3 * self.hidden * self.slots.element_size()
        for slot, job in pending.items():
            self._compute(out, x, order, w_flat, starts, K, slot, *job)
        if future is not None:
            t = time.perf_counter()
            out += future.result().to(self.device, non_blocking=True)
            s.cpu_wait_s += time.perf_counter() - t

        s.lookups += len(experts)
        s.hits += len(experts) - len(misses)
        s.resident_hits += sum(1 for e in experts if (l, e) in self.cache.resident)
        s.cpu_experts += sum(r / I for r in rows.values())
        s.copied_experts += sum((I - r) / I for r in rows.values())
        s.miss_bytes += len(misses) * self.host.expert_bytes
        s.backend_s += time.perf_counter() - t_in
        return out.to(x.dtype)

    def _compute(self, out, x, order, w_flat, starts, K, slot, e, r, ready) -> None:
        """Rows r:I of expert e from `slot` on the fast device, weighted, into out [N, H] fp32."""
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if ready is not None:
            stream.wait_event(ready)
        idx = order[starts[e]:starts[e + 1]]
        gate, up, down_t = expert_rows(self.slots[slot], self.inter, r, self.inter)
        y = partial_ffn(x[idx // K], gate, up, down_t)                           # [n, H]
        out.index_add_(0, idx // K, y.float() * w_flat[idx, None].float())
        if stream is not None:
            self.slot_free[slot] = stream.record_event()

    def _copy_in(self, slot: int, l: int, e: int, r: int) -> torch.cuda.Event | None:
        """Rows r:I of expert (l, e) into `slot`: one transfer for a whole expert, three for a part."""
        src, dst = self.host.data[l, e], self.slots[slot]
        ctx = torch.cuda.stream(self.copy_stream) if self.cuda else nullcontext()
        with ctx:
            if self.cuda and slot in self.slot_free:
                self.copy_stream.wait_event(self.slot_free[slot])
            if r == 0:
                dst.copy_(src, non_blocking=True)
            else:
                I = self.inter
                for d, s in zip(expert_rows(dst, I, r, I), expert_rows(src, I, r, I)):
                    d.copy_(s, non_blocking=True)
            return self.copy_stream.record_event() if self.cuda else None

    def _timed_cpu_part(self, l: int, x: torch.Tensor, jobs) -> torch.Tensor:
        t = time.perf_counter()
        out = self._cpu_part(l, x, jobs)
        dt = time.perf_counter() - t
        self.stats.cpu_s += dt
        if self.costs is not None and self.calibrate:
            predicted = sum(self.costs.cpu(len(tok), r / self.inter) for _, r, tok, _ in jobs)
            ratio = min(max(dt / max(predicted, 1e-9), CPU_SCALE_RANGE[0]), CPU_SCALE_RANGE[1])
            self.cpu_scale += CPU_SCALE_SMOOTHING * (ratio - self.cpu_scale)
        return out

    def _cpu_part(self, l: int, x: torch.Tensor, jobs) -> torch.Tensor:
        """Rows 0:r of each job's expert on the CPU, weighted and summed: [N, H] fp32 (pinned when a GPU waits)."""
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, pin_memory=self.cuda)
        return self.cpu(self.host.data[l], x, [Job(e, tok, w, 0, r) for e, r, tok, w in jobs], out)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
