"""What one expert costs on each path, measured on the running machine (the latency planner's inputs).

Legend: n = tokens routed to the expert, f = fraction of the expert's intermediate rows, m = experts in a call.
CPU and GPU times are piecewise linear in n between measured points (proportional beyond the last);
a part of an expert costs its fraction of the whole, since the work and the bytes both scale with f.
A CPU call of m experts costs its fixed part (the kernel's thread pool and preparation) once, and each expert
its time alone less that part: for small experts (Qwen3's take ~0.2 ms) the fixed part is most of one alone.
A GPU wave (the experts in a set of slots, grouped passes) likewise pays its launches once per pass.
"""

from __future__ import annotations

import math
import statistics
import time
from bisect import bisect_left
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cost model itself needs no torch; only measuring does
    import torch

TOKEN_POINTS = (1, 4, 16, 64, 256)
# A wave's experts run as grouped GEMMs, one pass with one set of launches, in passes of at most this many
# entries (token, expert pairs) or what the step's workspace holds, whichever is more: a pass holds all its
# entries' intermediate activations at once (experts/waves.py, engine/budget.py pass_entries_per_token).
GROUPED_MAX_ENTRIES = 64


def grouped_cap(tokens: int, per_token: float = 1.0) -> int:
    """Entries one grouped pass may hold in a step of `tokens` tokens, where the workspace has room for
    `per_token` entries per token."""
    return max(GROUPED_MAX_ENTRIES, int(tokens * per_token))


def grouped_passes(sizes: list[int], cap: int) -> list[list[int]]:
    """Indices of `sizes` in order, cut into consecutive passes of at most `cap` entries (one larger item
    alone in its pass)."""
    passes: list[list[int]] = []
    n = 0
    for i, m in enumerate(sizes):
        if not passes or n + m > cap:
            passes.append([])
            n = 0
        passes[-1].append(i)
        n += m
    return passes


def _interp(points: tuple[int, ...], times: tuple[float, ...], n: int) -> float:
    if n <= points[0]:
        return times[0]
    if n >= points[-1]:
        return times[-1] * n / points[-1]
    i = bisect_left(points, n)
    a, b = points[i - 1], points[i]
    return times[i - 1] + (times[i] - times[i - 1]) * (n - a) / (b - a)


@dataclass(frozen=True)
class ExpertCosts:
    """Seconds for one whole expert: on the CPU, copied host->GPU, and on the GPU, by token count."""

    tokens: tuple[int, ...]    # the token counts measured
    cpu_s: tuple[float, ...]   # CPU expert FFN at each count
    gpu_s: tuple[float, ...]   # GPU expert FFN at each count
    copy_s: float              # one whole expert host -> GPU
    copy_latency_s: float = 0.0  # fixed cost of one transfer (a partial expert takes three)
    cpu_call_s: float = 0.0    # fixed cost of handing work to the CPU worker and collecting it
    cpu_fixed_s: float = 0.0   # of each cpu_s, the kernel call's fixed part (paid once per call of m experts)
    cpu_alone: float = 1.0     # CPU time with no copy beside it, as a fraction of cpu_s (measured at 1 token)
    gpu_fixed_s: float = 0.0   # of each gpu_s, a wave's fixed part (its launches; paid once per wave)
    copy_launch_s: float = 0.0  # host time to launch one copy (the transfer and its event)
    copy_alone_s: float = 0.0  # one whole expert host -> GPU with no CPU work beside it (0: not measured)

    def cpu(self, n: int, f: float = 1.0) -> float:
        """One expert alone (or its fraction f) on the CPU."""
        return _interp(self.tokens, self.cpu_s, n) * f

    def cpu_each(self, n: int, f: float = 1.0, alone: bool = False) -> float:
        """One expert (or its fraction f) within a call of several: its time alone less the call's fixed part;
        beside copies (cpu_s), or with none (cpu_alone of it)."""
        t = _interp(self.tokens, self.cpu_s, n) * (self.cpu_alone if alone else 1.0)
        return max(t - self.cpu_fixed_s, 0.0) * f

    def cpu_work(self, jobs: list[tuple[int, float]], beside_copies: bool) -> float:
        """A CPU call's kernel time for jobs (tokens n, fraction f): its fixed part once, each job's own part,
        at the speed the CPU reads beside copies (cpu_s) or alone. Without the hand-off (cpu_call_s).
        The fixed part (measured alone) reads no weights, so only the jobs' parts are faster with no copy
        beside them: a Qwen3 expert alone is mostly fixed part, and scaling the whole call took the many
        experts of a fiddler layer at twice their time."""
        if not jobs:
            return 0.0
        return self.cpu_fixed_s + sum(self.cpu_each(n, f, alone=not beside_copies) for n, f in jobs)

    def cpu_call(self) -> float:
        """Once per CPU call: handing the work over and back, and the kernel's fixed part."""
        return self.cpu_call_s + self.cpu_fixed_s

    def gpu(self, n: int, f: float = 1.0) -> float:
        return _interp(self.tokens, self.gpu_s, n) * f

    def gpu_wave(self, jobs: list[tuple[int, float]], tokens: int = 1, per_token: float = 1.0) -> float:
        """One wave of experts on the GPU, jobs (tokens n, fraction f), in a step of `tokens` tokens whose
        workspace holds per_token entries per token in a grouped pass: each pass its fixed part once, each
        expert its own time less that part."""
        passes = grouped_passes([n for n, _ in jobs], grouped_cap(tokens, per_token))
        return sum(self.gpu_fixed_s + sum(max(self.gpu(jobs[i][0]) - self.gpu_fixed_s, 0.0) * jobs[i][1]
                                          for i in p) for p in passes)

    def with_rates(self, expert_bytes: int, gpu_bw: float, cpu_read_bw: float = 0.0, h2d_bw: float = 0.0
                   ) -> ExpertCosts:
        """What the measured times leave open, from the machine's rates (bytes/s; 0: unknown):
        gpu_fixed_s, where not measured, as what one expert alone at 1 token takes beyond reading its weights at
        gpu_bw (a decode expert is memory-bound: the rest is launching it);
        copy_alone_s, where not measured (older profiles), as its bytes at h2d_bw;
        cpu_fixed_s at most what leaves an expert's own part (alone, 1 token) the time to read its weights at
        cpu_read_bw: the fixed part is a small difference of two timings (one expert, four in a call), and noise
        in it could otherwise leave an expert's own part faster than the host's memory allows."""
        c = self
        if not c.gpu_fixed_s and gpu_bw and c.gpu_s:
            c = replace(c, gpu_fixed_s=max(c.gpu_s[0] - expert_bytes / gpu_bw, 0.0))
        if not c.copy_alone_s and h2d_bw and c.copy_s:
            c = replace(c, copy_alone_s=min(c.copy_s, expert_bytes / h2d_bw + c.copy_latency_s))
        if cpu_read_bw and c.cpu_s:
            own = c.cpu_s[0] * c.cpu_alone - c.cpu_fixed_s
            c = replace(c, cpu_fixed_s=max(c.cpu_fixed_s - max(expert_bytes / cpu_read_bw - own, 0.0), 0.0))
        return c

    def copy(self, f: float = 1.0, alone: bool = False) -> float:
        """A fraction f of an expert host -> GPU (a part takes three transfers); alone: no CPU work beside it
        (the two share host memory: a Qwen3 expert crossed in 0.28 ms beside the CPU, 0.17 at the link's rate)."""
        whole = self.copy_alone_s if alone and self.copy_alone_s else self.copy_s
        return whole * f + (self.copy_latency_s * 2 if 0 < f < 1 else 0.0)

    def scaled(self, cpu: float, copy: float = 1.0) -> ExpertCosts:
        """The same costs with the CPU's times multiplied by `cpu` and the copy's by `copy` (corrections
        observed while running)."""
        return replace(self, cpu_s=tuple(t * cpu for t in self.cpu_s), cpu_fixed_s=self.cpu_fixed_s * cpu,
                       copy_s=self.copy_s * copy)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> ExpertCosts:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


def median_costs(measured: list[ExpertCosts]) -> ExpertCosts:
    """Field by field median of several measurements of the same costs, each point on its own: a slow spell of a
    shared host during one of them is outvoted. Medians of monotone series stay monotone."""
    first = measured[0]
    if any(m.tokens != first.tokens for m in measured):
        raise ValueError(f"costs measured at different token counts: {[m.tokens for m in measured]}")

    def med(k):
        vals = [getattr(m, k) for m in measured]
        return tuple(statistics.median(v) for v in zip(*vals)) if isinstance(vals[0], tuple) else \
            statistics.median(vals)
    return ExpertCosts(**{k: first.tokens if k == "tokens" else med(k) for k in first.__dataclass_fields__})


def median_s(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls (at least one) after a warm-up; sync() ends each call."""
    fn()
    sync()
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def paired_s(a: Callable[[], object], b: Callable[[], object], repeats: int,
             sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median seconds of a() and of b(), timed in turns (after a warm-up of each), so that a drift of the
    machine's speed during the measurement affects both alike: their difference is what is wanted. sync()
    ends each call."""
    a(), b()
    sync()
    ta, tb = [], []
    for _ in range(max(repeats, 1)):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return sorted(ta)[len(ta) // 2], sorted(tb)[len(tb) // 2]


def device_sync(dev) -> Callable[[], None]:
    """What waits for `dev` to finish its queued work (nothing to wait for on the CPU)."""
    import torch

    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def median_sample(sample: Callable[[], float], repeats: int) -> float:
    """Median of `repeats` values of sample() (at least one), each a time it measured itself, after a warm-up
    one: for timings that a plain clock around a call cannot take (events on a stream, a clock started after
    some setup)."""
    sample()
    times = [sample() for _ in range(max(repeats, 1))]
    return sorted(times)[len(times) // 2]


def handoff_s(pool: ThreadPoolExecutor, n: int = 20) -> float:
    """Seconds to hand a no-op to the pool's thread and get it back (median, after one warm-up): a CPU call's
    hand-off."""
    return median_s(lambda: pool.submit(lambda: None).result(), lambda: None, n)


def fixed_part(t1: float, tm: float, m: int) -> float:
    """The fixed part of a call, from one expert alone (t1) and m in one call (tm): t1 = c + e, tm = c + m e."""
    return min(max((m * t1 - tm) / (m - 1), 0.0), t1) if m > 1 else 0.0


def one_and_fixed(one: Callable[[], object], many: tuple[int, Callable[[], object]] | None,
                  repeats: int) -> tuple[float, float]:
    """Median seconds of one() (one expert in a call) and the call's fixed part: with many = (m, fn), fn() runs
    m experts in one call and the two are timed in turns (paired_s); without, the fixed part is 0."""
    if many is None:
        return median_s(one, lambda: None, repeats), 0.0
    m, fn = many
    t1, tm = paired_s(one, fn, repeats)
    return t1, fixed_part(t1, tm, m)


def monotone(times: list[float]) -> list[float]:
    """Each time capped by every later one (times by rising token count). Fewer tokens on the same expert never
    take longer (the same weights, less arithmetic), and noise only adds time: a point above a later one is the
    host's."""
    out = list(times)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def measure_costs(host_block: Callable[[int], torch.Tensor], inter: int, hidden: int, n_blocks: int,
                  slot: torch.Tensor, cpu_ffn: Callable, gpu_ffn: Callable, repeats: int = 5,
                  copy_stream: torch.cuda.Stream | None = None,
                  cpu_many: tuple[int, Callable[[torch.Tensor], object]] | None = None,
                  dtype: torch.dtype | None = None) -> ExpertCosts:
    """Time the three paths on real expert blocks, as they run in the engine: the CPU path while copies are
    under way (both read host memory) and the copy while the CPU computes, each beside the other for its
    whole time, as in a layer whose plan balances the two (a copy timed beside a shorter CPU call reads
    faster than the engine's copies do).

    host_block(i) -> [3IH] the i-th host expert (rotated through so the CPU reads from memory, not cache);
    slot [3IH] a free expert slot on the fast device; cpu_ffn/gpu_ffn(x, block) run one whole expert;
    cpu_many = (m, fn): fn(x) runs m other experts on x in one CPU call (each call other ones), which gives
    the call's fixed part. dtype: the activations' (default the slot's; a quantized slot is uint8)."""
    import torch

    dev = slot.device
    sync = device_sync(dev)
    dtype = dtype or slot.dtype
    turn = iter(range(1 << 30))

    def next_block():
        return host_block(next(turn) % n_blocks)

    def copy_in():
        with torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext():
            slot.copy_(next_block(), non_blocking=True)

    def copy_timed(cpu_calls: int) -> float:
        """One copy timed on the copy engine with events, while the CPU computes `cpu_calls` experts beside it."""
        x1 = torch.randn(1, hidden, dtype=dtype)
        with ThreadPoolExecutor(1) as pool:
            def once() -> float:
                blocks = [next_block() for _ in range(cpu_calls)]
                job = pool.submit(lambda: [cpu_ffn(x1, b) for b in blocks]) if blocks else None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(copy_stream)
                copy_in()
                end.record(copy_stream)
                if job is not None:
                    job.result()
                sync()
                return start.elapsed_time(end) / 1e3
            return median_sample(once, repeats)

    copy_alone_s = 0.0
    if copy_stream is None:
        copy_s = median_s(copy_in, sync, repeats)
    else:
        copy_alone_s = copy_timed(0)

    def cpu_beside_copies(x, copies: int) -> float:
        """Median seconds of one expert on the CPU with `copies` copies queued on the copy engine as it starts
        (launched before the clock starts: their launches are the host's, not the CPU call's)."""
        def once() -> float:
            sync()
            for _ in range(copies):
                copy_in()
            t = time.perf_counter()
            cpu_ffn(x, next_block())
            return time.perf_counter() - t
        t = median_sample(once, repeats)
        sync()
        return t

    cpu_s, gpu_s = [], []
    for n in TOKEN_POINTS:
        xc = torch.randn(n, hidden, dtype=dtype)
        copies = 0
        if copy_alone_s:  # how many copies cover a call: one more than its time alone over a copy's
            t = time.perf_counter()
            cpu_ffn(xc, next_block())
            copies = math.ceil((time.perf_counter() - t) / copy_alone_s) + 1
        cpu_s.append(cpu_beside_copies(xc, copies))
        xg = xc.to(dev)
        gpu_s.append(median_s(lambda: gpu_ffn(xg, slot), sync, repeats))
    launch_s = 0.0
    if copy_stream is not None:
        # as many experts on the CPU as cover the copy, and one more
        copy_s = copy_timed(math.ceil(copy_alone_s / max(cpu_s[0], 1e-6)) + 1)

        def launch() -> float:  # the host's part of a copy: launching it and recording its arrival
            t = time.perf_counter()
            copy_in()
            copy_stream.record_event()
            t = time.perf_counter() - t
            sync()
            return t
        launch_s = median_sample(launch, repeats)
    small = slot[:hidden]
    latency = median_s(lambda: small.copy_(host_block(0)[:hidden], non_blocking=True), sync, repeats)
    # One expert alone (the copy engine idle) and, where given, m in one call, timed in turns: the call's fixed
    # part is a small difference of the two. Neither has a copy beside it: a queued copy would cover all of one
    # expert's call but only part of m experts', and that difference would pass for a fixed part.
    sync()
    x1 = torch.randn(1, hidden, dtype=dtype)
    many = (cpu_many[0], lambda: cpu_many[1](x1)) if cpu_many is not None else None
    t1, fixed = one_and_fixed(lambda: cpu_ffn(x1, next_block()), many, repeats)
    if copy_stream is None:  # no copies: both measure the same; the one timed in turns with the m-expert call
        cpu_s[0] = t1
    cpu_s, gpu_s = monotone(cpu_s), monotone(gpu_s)
    # a call's fixed part is part of one expert's call: at most that, once a later point has capped it
    fixed = min(fixed, cpu_s[0])
    # the speed in a layer that copies nothing, as a fraction of beside copies
    alone = min(t1 / cpu_s[0], 1.0) if copy_stream is not None else 1.0
    return ExpertCosts(TOKEN_POINTS, tuple(cpu_s), tuple(gpu_s), copy_s, latency, cpu_fixed_s=fixed,
                       cpu_alone=alone, copy_launch_s=launch_s, copy_alone_s=copy_alone_s)
