"""Experts on the CPU: one call per layer runs every (expert, tokens, rows) job with the native kernel, or
with PyTorch where the kernel cannot be built or the store is not bf16. Settings: config.CpuKernelConfig.

Env: MOEFLOW_CPU_KERNEL = auto | torch | scalar | avx2 | avx512 | amx | amx-emu (the kernel where the config
leaves it at auto; auto: the fastest this CPU runs); MOEFLOW_CPU_THREADS (default: the physical cores this process
may use).
Legend: N = tokens, K = experts per token, H = hidden, I = intermediate rows, E = experts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moeflow import MoeflowError
from moeflow.config import CpuKernelConfig
from moeflow.experts.ffn import partial_ffn
from moeflow.experts.native import KERNELS, NativeKernel, load, native_format, options
from moeflow.experts.store import expert_rows
from moeflow.perf.costs import handoff_s, median_s
from moeflow.quant.format import ExpertFormat


def physical_cores() -> int:
    """Cores (not SMT siblings) among the CPUs this process may run on."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add((topo / "physical_package_id").read_text().strip() + "/" +
                      (topo / "core_cpus_list" if (topo / "core_cpus_list").exists()
                       else topo / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(len(cores), 1)


TORCH_THREADS = torch.get_num_threads()  # PyTorch's default (the physical cores), read before anyone sets it


@dataclass(frozen=True)
class ThreadSplit:
    kernel: int  # the native CPU kernel's threads
    torch: int   # PyTorch's intra-op threads


def thread_split(driver: bool) -> ThreadSplit:
    """The host's threads for expert work. driver: a thread drives a GPU, and one core stays with it (a CPU
    expert split over all cores waits for its slowest thread, which would share a core with the driver).
    The kernel's count is MOEFLOW_CPU_THREADS where set."""
    reserve = int(driver)
    env = os.environ.get("MOEFLOW_CPU_THREADS")
    kernel = max(int(env), 1) if env else max(physical_cores() - reserve, 1)
    return ThreadSplit(kernel, max(TORCH_THREADS - reserve, 1))


def cpu_threads(driver: bool = False) -> int:
    """The native kernel's threads of thread_split(driver)."""
    return thread_split(driver).kernel


def default_threads(reserve: int = 0) -> int:
    """cpu_threads(driver=reserve > 0), under its former name."""
    return cpu_threads(reserve > 0)


class CpuCall:
    """A CPU call handed over. result() waits for it and returns its output [N, H] fp32; then start_s is the
    time from the hand-over to the work starting and busy_s the work's own (seconds)."""

    def __init__(self, out: torch.Tensor, wait: Callable[[], tuple[float, float]] | None = None, keep=()):
        self.out, self._wait, self._keep = out, wait, keep  # keep: what the native call reads until it ends
        self.start_s = self.busy_s = 0.0

    def result(self) -> torch.Tensor:
        if self._wait is not None:
            wait, self._wait = self._wait, None
            self.start_s, self.busy_s = wait()
            self._keep = ()
        return self.out

    def __del__(self):  # dropped unread (an error on the way): the native call must end before its inputs go
        if self._wait is not None:
            self.result()


@dataclass
class Job:
    """Rows r0:r1 of expert e for the tokens tok (row indices of x), weighted by w (tensors or lists)."""

    expert: int
    tok: torch.Tensor | list[int]   # [n]
    w: torch.Tensor | list[float]   # [n]
    r0: int = 0
    r1: int | None = None  # None = all rows


def jobs_from_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> list[Job]:
    """Every selected expert of a layer, whole, on its tokens."""
    K = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    w = topk_weights.flatten()[order]
    jobs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            jobs.append(Job(e, order[start:start + n] // K, w[start:start + n]))
            start += n
    return jobs


class CpuExperts:
    """Runs one layer's expert jobs on the CPU. threads and kernel override the config's (kernel: a name of
    CpuKernelConfig.kernel; where both leave it at auto, MOEFLOW_CPU_KERNEL)."""

    def __init__(self, threads: int | None = None, kernel: str | None = None, fmt: ExpertFormat | None = None,
                 config: CpuKernelConfig | None = None):
        cfg = config or CpuKernelConfig()
        if fmt is not None and fmt.quantized and fmt.dtype == torch.float32:
            # an fp32 run asks for exact numerics: int8 tokens round at about bf16's precision, not fp32's
            cfg = replace(cfg, quant_int8_tokens=0)
        self.config = cfg
        self.threads = threads or cfg.threads or cpu_threads()
        # quantized blocks (group-wise int4/int8); biased ones (experts/biased.py: bf16 by the kernel, else PyTorch)
        self.fmt = fmt if fmt is not None and (fmt.quantized or fmt.biased) else None
        name = kernel or (cfg.kernel if cfg.kernel != "auto" else os.environ.get("MOEFLOW_CPU_KERNEL", "auto"))
        if name not in ("auto", "torch", *KERNELS):
            raise MoeflowError(f"MOEFLOW_CPU_KERNEL={name}: choose auto, torch or one of {', '.join(KERNELS)}")
        self.native: NativeKernel | None = None if name == "torch" else load()
        if self.native is None:
            self.kernel = "torch"
        elif name == "auto":
            self.kernel = self.native.best()
        elif not self.native.can_run(name):
            raise MoeflowError(f"MOEFLOW_CPU_KERNEL={name}: this CPU cannot run it (it has "
                               f"{', '.join(sorted(self.native.features)) or 'none of avx2, avx512, amx'})")
        else:
            self.kernel = name
        # AMX pays from about 16 tokens per expert (AVX512-BF16 below); the emulation tiles every job (tests)
        self.amx_min_tokens = cfg.amx_min_tokens or (16 if self.kernel == "amx" else 1)
        self.fused_max_bytes = cfg.fused_max_bytes  # per-thread sums of the one-pass down path, all threads together
        self.amx_blocking = cfg.amx_blocking
        # the native kernel's format for quantized blocks (None: bf16, or PyTorch dequantizes)
        self.qfmt = native_format(self.fmt) if self.fmt and self.fmt.quantized and self.native else None
        self.threads_used = 0  # as reported by the last native call
        self.kernel_s = 0.0    # seconds inside the native kernel in the last call (0: it did not run)
        self._pool: ThreadPoolExecutor | None = None  # the PyTorch path's worker thread (submit)
        self._options: tuple | None = None  # (the settings options() read, its array)

    def options(self) -> np.ndarray:
        """The native call's options from the config and this object's (test-adjustable) settings; made again
        only when those change (a call per layer)."""
        key = (self.config, self.fused_max_bytes, tuple(self.amx_blocking), self.amx_min_tokens)
        if self._options is None or self._options[0] != key:
            cfg = replace(self.config, fused_max_bytes=self.fused_max_bytes, amx_blocking=key[2])
            biased = self.fmt if self.fmt is not None and self.fmt.biased else None
            self._options = key, options(cfg, self.amx_min_tokens, biased)
        return self._options[1]

    def uses_native(self, data: torch.Tensor) -> bool:
        if self.native is None or self.kernel == "torch":
            return False
        if self.fmt is not None and self.fmt.quantized:
            return data.dtype == torch.uint8 and self.qfmt is not None
        return data.dtype == torch.bfloat16  # plain blocks, or biased ones (the kernel's vector paths)

    def __call__(self, data: torch.Tensor, x: torch.Tensor, jobs: list[Job], out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """data [E, 3IH] one layer of the host store; x [N, H]; adds every job into out [N, H] fp32 (new if
        None) and returns it."""
        return self.submit(data, x, jobs, out, inline=True).result()

    def submit(self, data: torch.Tensor, x: torch.Tensor, jobs: list[Job], out: torch.Tensor | None = None,
               spin: int = 0, inline: bool = False) -> CpuCall:
        """The same, handed over: the native kernel runs on its own thread, so no Python thread waits for the
        GIL before or after it; the PyTorch path runs on this object's worker thread (or here, inline).
        spin: pause iterations result() spins before it sleeps (where the caller has a core of its own)."""
        N, H = x.shape
        I = self.fmt.inter if self.fmt else data.shape[1] // (3 * H)
        if out is None:
            out = _zeros(N, H)
        jobs = [j for j in jobs if len(j.tok) and (I if j.r1 is None else j.r1) > j.r0]
        self.kernel_s = 0.0
        if not jobs:
            return CpuCall(out)
        if not (self.uses_native(data) and out.is_contiguous() and out.dtype == torch.float32):
            return self._in_thread(lambda: self._torch(data, x, jobs, out, I), out, inline)
        assert data.stride(1) == 1 and data.device.type == "cpu", "data must be a [E, 3IH] view of the host store"
        parts = self._token_parts(jobs, H)
        if len(parts) > 1:  # quantized: the per-thread sums of all tokens would not fit; a call per part
            return self._in_thread(lambda: [self.submit(data, x, p, out, inline=True) for p in parts], out, inline)
        offs = [0]
        for j in jobs:
            offs.append(offs[-1] + len(j.tok))
        # numpy, not PyTorch ops: this runs on the thread that drives the GPU, once per layer
        meta = np.array([j.expert for j in jobs] + [j.r0 for j in jobs] +
                        [I if j.r1 is None else j.r1 for j in jobs] + offs, dtype=np.int32)
        if isinstance(jobs[0].tok, list):  # decode's few entries in lists: one array each, not one per job
            tok = np.array([t for j in jobs for t in j.tok], dtype=np.int32)
            w = np.array([v for j in jobs for v in j.w], dtype=np.float32)
        else:
            tok = np.concatenate([_array(j.tok, torch.int32) for j in jobs])
            w = np.concatenate([_array(j.w, torch.float32).reshape(-1) for j in jobs])
        xf = _fp32(x)
        opts = self.options()
        args = (self.kernel, self.threads, data, H, I, xf, N, meta, tok, w, out, opts, self.qfmt)
        if inline:  # on this thread: no hand-over
            t = time.perf_counter()
            self.threads_used = self.native.run(*args)
            self.kernel_s = sum(self.native.last_phases())
            busy_s = time.perf_counter() - t
            return CpuCall(out, lambda: (0.0, busy_s))
        self.native.start(*args)

        def finish() -> tuple[float, float]:
            self.threads_used, start_s, busy_s = self.native.finish(self.kernel, spin)
            self.kernel_s = sum(self.native.last_phases())
            return start_s, busy_s

        return CpuCall(out, finish, keep=(meta, tok, w, xf, opts))

    def _token_parts(self, jobs: list[Job], H: int) -> list[list[Job]]:
        """The jobs in parts whose down sums take at most fused_max_bytes: the quantized path keeps [n, H + G] per
        row chunk, about one chunk a thread per job beyond 16 tokens (four a thread below, where sums are small).
        bf16 jobs go in one part (the kernel chooses its down pass)."""
        if self.qfmt is None:
            return [jobs]
        budget = self._part_tokens(H)
        parts, part, used = [], [], 0
        for j in jobs:
            for a in range(0, len(j.tok), budget):
                n = min(budget, len(j.tok) - a)
                if used + n > budget and part:
                    parts.append(part)
                    part, used = [], 0
                part.append(Job(j.expert, j.tok[a:a + n], j.w[a:a + n], j.r0, j.r1))
                used += n
        return parts + [part] if part else parts

    def _part_tokens(self, H: int) -> int:
        """(token, expert) pairs whose quantized down sums fit fused_max_bytes: [n, H + G] fp32 per thread."""
        per_token = 4 * (self.threads + 1) * (H + H // int(self.qfmt[1]))
        return max(self.fused_max_bytes // per_token, 1)

    def handoff_s(self, n: int = 20) -> float:
        """Seconds to hand a call over and have it back, with no work in it (after one warm-up)."""
        if not self.uses_native(torch.empty(0, dtype=torch.bfloat16)):
            return handoff_s(self._executor())
        none = torch.zeros(1, 1, dtype=torch.bfloat16)
        meta, tok, w, x = np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), torch.zeros(1, 1)
        opts = self.options()

        def roundtrip():
            self.native.start(self.kernel, self.threads, none, 1, 1, x, 1, meta, tok, w, x, opts)
            self.native.finish(self.kernel)

        return median_s(roundtrip, lambda: None, n)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeflow-cpu-experts")
        return self._pool

    def _in_thread(self, fn: Callable[[], torch.Tensor], out: torch.Tensor, inline: bool) -> CpuCall:
        """fn on the worker thread (or here), timed as the native calls are, in the caller's inference mode
        (a thread's own: the caller's tensors may be inference tensors)."""
        t_submit, mode = time.perf_counter(), torch.is_inference_mode_enabled()

        def timed() -> tuple[float, float]:
            t = time.perf_counter()
            with torch.inference_mode(mode):
                fn()
            return t - t_submit, time.perf_counter() - t

        if inline:
            start_s, busy_s = timed()
            return CpuCall(out, lambda: (start_s, busy_s))
        return CpuCall(out, self._executor().submit(timed).result)

    def expert(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """One whole expert (block [3IH] in the host layout) on all of x [n, H]: [n, H] fp32."""
        n = x.shape[0]
        return self(block.view(1, -1), x, [Job(0, torch.arange(n), torch.ones(n))])

    def many(self, m: int, data: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """fn(x [n, H]): m whole experts of data [B, 3IH] on all of x in one call, the next m each call
        (rotating through data, so they are read from memory): for measuring a call's fixed part."""
        turn = iter(range(1 << 62))

        def fn(x: torch.Tensor) -> torch.Tensor:
            i = next(turn) % max(data.shape[0] // m, 1) * m
            n = x.shape[0]
            return self(data[i:i + m], x, [Job(e, list(range(n)), [1.0] * n) for e in range(min(m, data.shape[0]))])

        return fn

    def layer(self, data: torch.Tensor, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
              ) -> torch.Tensor:
        """Every selected expert of a layer: [N, H] fp32. The native path groups by expert in C: one call (biased
        blocks, and quantized ones whose down sums would pass fused_max_bytes, go as jobs)."""
        N, H = x.shape
        quantized = self.fmt is not None and self.fmt.quantized and not self.fmt.biased
        grouped = self.uses_native(data) and data.stride(1) == 1 and (
            self.fmt is None or (quantized and topk_ids.numel() <= self._part_tokens(H)))
        if not grouped:
            return self(data, x, jobs_from_topk(topk_ids, topk_weights, data.shape[0]))
        out = _zeros(N, H)
        if N:
            I = self.fmt.inter if quantized else data.shape[1] // (3 * H)
            self.threads_used = self.native.run_topk(
                self.kernel, self.threads, data, H, I, _fp32(x), topk_ids.to(torch.int64).contiguous(),
                topk_weights.to(torch.float32).contiguous(), out, self.options(), self.qfmt)
        self.kernel_s = sum(self.native.last_phases()) if N else 0.0
        return out

    def _torch(self, data, x, jobs, out, I):
        xd = x.to(self.fmt.dtype if self.fmt else data.dtype)
        for j in jobs:
            r1 = I if j.r1 is None else j.r1
            tok = torch.as_tensor(j.tok).long()
            if self.fmt is not None and self.fmt.biased:
                y = self.fmt.ffn(xd[tok], data[j.expert], j.r0, r1)
            else:
                gate, up, down_t = (self.fmt.rows(data[j.expert], j.r0, r1, xd.dtype) if self.fmt
                                    else expert_rows(data[j.expert], I, j.r0, r1))
                y = partial_ffn(xd[tok], gate, up, down_t)
            out.index_add_(0, tok, y.float() * torch.as_tensor(j.w).reshape(-1, 1).float())
        return out


_NP = {torch.int32: np.int32, torch.float32: np.float32}


# The kernel's inputs and outputs are made with numpy, not PyTorch ops: a PyTorch op on more than ~32k elements
# wakes its OpenMP threads, which then spin (GOMP_SPINCOUNT) on the cores the kernel is about to use.
def _zeros(N: int, H: int) -> torch.Tensor:
    """[N, H] fp32 zeros."""
    return torch.from_numpy(np.zeros((N, H), dtype=np.float32))


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x [N, H] as contiguous fp32: itself, or bf16 widened exactly (its bits are the high half of an fp32)."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    if x.dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int16).numpy().astype(np.int32) << 16
        return torch.from_numpy(bits.view(np.float32))
    return x.to(torch.float32).contiguous()


def _array(v: torch.Tensor | list, dtype: torch.dtype) -> np.ndarray:
    """A job's tokens or weights as a numpy array of this dtype (int32 or float32)."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype).numpy()
    return np.asarray(v, dtype=_NP[dtype])
