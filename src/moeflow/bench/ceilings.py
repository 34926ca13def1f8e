"""Hardware ceilings measured on the running machine, so that every figure can be set against a bound."""

from __future__ import annotations

import time

import torch

from moeflow.perf.costs import device_sync, median_s


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of fn() after a warm-up, the device synchronized after each call (perf.costs.median_s)."""
    return median_s(fn, device_sync(device), repeats)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large copy, counting bytes read plus bytes written (GPU), or of reading (CPU): the faster of
    PyTorch's sum and the native kernel's streaming loads on all physical cores (each the median of 5)."""
    src = torch.randn(nbytes // 4, device=device)
    if device.type == "cuda":
        dst = torch.empty_like(src)
        return 2 * nbytes / _time(lambda: dst.copy_(src), device)
    return max(nbytes / _time(lambda: src.sum(), device, repeats=5), native_read_bw(src))


def native_read_bw(src: torch.Tensor) -> float:
    """Bytes/s of the native kernel's reader over src (0 where the kernel is not built). PyTorch's sum reads
    slower than the kernel streams weights on the H200 host (88-100 against 113 GB/s): a ceiling below what
    the kernel reaches would not be one."""
    from moeflow.experts.cpu import cpu_threads
    from moeflow.experts.native import load

    kernel = load()
    if kernel is None:
        return 0.0
    kernel.read_bw(cpu_threads(), src, reps=1)  # warm-up: the pool's threads start
    return kernel.read_bw(cpu_threads(), src)


def matmul_rate(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matrix product on random data."""
    if device.type != "cuda":
        n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device)


def concurrent_host_read(device: torch.device, nbytes: int = 1 << 30, copies: int = 8) -> dict:
    """The CPU's memory read rate and the pinned host->device copy rate while both run at once: both draw
    on host memory, so together they may get less than the sum of their rates alone (what the latency
    regime's bound assumes). {} without a GPU."""
    if device.type != "cuda":
        return {}
    src = torch.randn(nbytes // 4)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    src.sum()
    dst.copy_(pinned, non_blocking=True)  # warm-up of both
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(copies):
            dst.copy_(pinned, non_blocking=True)
        end.record()
    reads, t = 0, time.perf_counter()
    while reads == 0 or not end.query():  # the CPU reads for as long as the copies run
        src.sum()
        reads += 1
    cpu_s = time.perf_counter() - t
    end.synchronize()
    return {"cpu_read_bw_concurrent": reads * nbytes / cpu_s,
            "h2d_bw_concurrent": copies * nbytes / (start.elapsed_time(end) / 1e3)}
