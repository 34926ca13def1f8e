"""How the host memory behind the expert store changes the CPU expert kernel and the copies (on the GPU host).

For plain memory (torch.empty) and memory advised to use transparent huge pages (madvise MADV_HUGEPAGE before
the first touch), each before and after page-locking it in place (cudaHostRegister, as ExpertStore.pin does):
  kernel  one expert per call, 1 token, rotating through the experts (so they come from DRAM): ms and GB/s
  gap     the same with a 1 ms pause between calls (the engine's layers: the kernel's threads go idle between
          calls), against back-to-back: the cost of waking the threads
  copy    one expert host -> GPU from the registered memory: GB/s
The threads' idle spin is CpuKernelConfig.spin (`bench cpu-experts --spin`).

Usage: PYTHONPATH=src python scripts/probes/host_memory.py [--shape mixtral-8x7b] [--experts 8] [--reps 5] [--out F]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time

import torch

from moeflow.experts.cpu import CpuExperts, Job, default_threads
from moeflow.synthetic import PRESETS

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def anon_huge_kib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def thp_setting() -> str:
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        return "unknown"


def store(n: int, huge: bool) -> torch.Tensor:
    """[n] bf16, filled; with huge, advised to use huge pages before the first touch."""
    t = torch.empty(n, dtype=torch.bfloat16)
    if huge:
        p = t.data_ptr()
        start = (p + HUGE - 1) // HUGE * HUGE
        end = (p + n * 2) // HUGE * HUGE
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) != 0:
            print("madvise failed:", os.strerror(ctypes.get_errno()))
    t.normal_(0, 0.02)
    return t


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_ms(cpu: CpuExperts, data: torch.Tensor, H: int, reps: int, gap_s: float) -> float:
    """Median ms of one expert at 1 token, rotating through the experts, with gap_s between calls."""
    x = torch.randn(1, H)
    E = data.shape[0]
    times = []
    for i in range(reps * E):
        if gap_s:
            time.sleep(gap_s)
        t = time.perf_counter()
        cpu(data, x, [Job(i % E, [0], [1.0])])
        times.append(time.perf_counter() - t)
    return statistics.median(times[E:]) * 1e3  # the first round warms up


def copy_gbps(data: torch.Tensor, reps: int) -> float:
    dst = torch.empty(data.shape[1], dtype=data.dtype, device="cuda")
    s = torch.cuda.Stream()

    def one(i=[0]):
        with torch.cuda.stream(s):
            dst.copy_(data[i[0] % data.shape[0]], non_blocking=True)
        s.synchronize()
        i[0] += 1

    one()
    return data[0].numel() * 2 / timed(one, reps * 2) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = PRESETS[a.shape]
    H, I = cfg["hidden_size"], cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    numel = 3 * I * H
    cuda = torch.cuda.is_available()
    cpu = CpuExperts(threads=default_threads(reserve=1 if cuda else 0))
    meta = {"thp": thp_setting(), "spin": cpu.config.spin, "kernel": cpu.kernel,
            "threads": cpu.threads, "expert_mb": numel * 2 / 1e6, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime())}
    print(meta)
    rows = []
    for huge in (False, True):
        before = anon_huge_kib()
        flat = store(a.experts * numel, huge)
        data = flat.view(a.experts, numel)
        grown = (anon_huge_kib() - before) / 1024
        for registered in (False, True) if cuda else (False,):
            if registered:
                err = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel() * 2, 0))
                assert err == 0, f"cudaHostRegister failed: {err}"
            ms = kernel_ms(cpu, data, H, a.reps, 0.0)
            ms_gap = kernel_ms(cpu, data, H, a.reps, 1e-3)
            row = {"huge_pages": huge, "anon_huge_mib": round(grown), "registered": registered,
                   "kernel_ms": ms, "kernel_gbps": numel * 2 / ms / 1e6, "kernel_ms_after_gap": ms_gap,
                   "copy_gbps": copy_gbps(data, a.reps) if registered else None}
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        if cuda:
            torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())
        del data, flat
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
