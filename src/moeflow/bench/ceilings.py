"""Hardware ceilings measured on the running machine, so that every figure can be set against a bound."""

from __future__ import annotations

import time

import torch

from moeflow.perf.costs import device_sync, median_s


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of fn() after a warm-up, the device synchronized after each call (perf.costs.median_s)."""
    return median_s(fn, device_sync(device), repeats)


def memory_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large copy, counting bytes read plus bytes written (GPU), or the CPU's read ceiling
    (cpu_read_ceiling: the best of several readers)."""
    if device.type == "cuda":
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        return 2 * nbytes / _time(lambda: dst.copy_(src), device)
    return max(cpu_read_ceiling(nbytes).values())


def _best(fn, nbytes: int, repeats: int) -> float:
    """Bytes/s of fn()'s fastest run after a warm-up: a ceiling is what the machine can do, not its average."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def cpu_read_ceiling(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of reading `nbytes` of host memory, each reader's best run: the native kernel's streaming loads on
    every physical core and on all but one, PyTorch's and NumPy's sums, and a copy (its bytes read). A peer that
    reads faster than every one of these would show the ceiling wrong, so the bound takes their maximum."""
    from moeflow.experts.cpu import cpu_threads

    src = torch.randn(nbytes // 4)
    arr, dst = src.numpy(), torch.empty_like(src)
    rates = {"torch_sum": _best(src.sum, nbytes, repeats),
             "numpy_sum": _best(lambda: arr.sum(dtype="float32"), nbytes, repeats),
             "copy": _best(lambda: dst.copy_(src), nbytes, repeats)}
    for name, threads in (("native_all_cores", cpu_threads()), ("native_less_one", cpu_threads(driver=True))):
        if name == "native_less_one" and threads == cpu_threads():
            continue
        rate = native_read_bw(src, threads, repeats)
        if rate:
            rates[name] = rate
    return rates


def native_read_bw(src: torch.Tensor, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of the native kernel's widest streaming loads over src on `threads` threads, the best of `repeats`
    passes (0 where the kernel is not built)."""
    from moeflow.experts.cpu import cpu_threads
    from moeflow.experts.native import load

    kernel = load()
    if kernel is None:
        return 0.0
    threads = threads or cpu_threads()
    kernel.read_bw(threads, src, reps=1)  # warm-up: the pool's threads start
    return kernel.read_bw(threads, src, reps=repeats, best=True)


def matmul_rate(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matrix product on random data."""
    if device.type != "cuda":
        n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device)


def concurrent_host_read(device: torch.device, nbytes: int = 1 << 30, copies: int = 8) -> dict:
    """The CPU's memory read rate and the pinned host->device copy rate while both run at once: both draw
    on host memory, so together they may get less than the sum of their rates alone (what the latency
    regime's bound assumes). The CPU reads as the expert kernel does (its streaming loads on the cores left
    beside the GPU's driver thread), else with torch.sum. {} without a GPU."""
    if device.type != "cuda":
        return {}
    from moeflow.experts.cpu import cpu_threads
    from moeflow.experts.native import load

    src = torch.randn(nbytes // 4)
    kernel, threads = load(), cpu_threads(driver=True)
    read = (lambda: kernel.read_bw(threads, src, reps=1)) if kernel is not None else src.sum
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    read()
    dst.copy_(pinned, non_blocking=True)  # warm-up of both
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(copies):
            dst.copy_(pinned, non_blocking=True)
        end.record()
    reads, t = 0, time.perf_counter()
    while reads == 0 or not end.query():  # the CPU reads for as long as the copies run
        read()
        reads += 1
    cpu_s = time.perf_counter() - t
    end.synchronize()
    return {"cpu_read_bw_concurrent": reads * nbytes / cpu_s,
            "h2d_bw_concurrent": copies * nbytes / (start.elapsed_time(end) / 1e3)}
