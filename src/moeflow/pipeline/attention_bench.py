"""`python -m moeflow.pipeline.attention_bench`: the native CPU decode-attention kernel on one micro-batch of a
model's shape (a host arena of B runs of `ctx` positions), its time and the K/V bytes it reads per second.

Legend: B = sequences, Hq/Hkv = heads, D = head dim.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import cache

import torch

from moeflow.experts.cpu import physical_cores
from moeflow.pipeline.native import KERNELS, load


def bench(B: int, ctx: int, Hq: int, Hkv: int, D: int, threads: int, repeat: int, kernel: str | None = None,
          spread: float = 0.5, shared: bool = False) -> dict:
    """Sequences of contexts spread evenly over ctx * (1 -/+ spread): time per call and K/V read rate. shared: K and
    V one arena (MLA's latent rows, read once)."""
    native = load()
    if native is None:
        raise SystemExit("the native CPU attention kernel could not be built")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4096, Hkv, D, generator=g).bfloat16()  # tiled over the arenas: fast at a GiB
    lens = [max(1, round(ctx * (1 - spread + 2 * spread * i / max(B - 1, 1)))) for i in range(B)]
    runs = torch.tensor([0, *lens[:-1]], dtype=torch.int64).cumsum(0).to(torch.int32)  # runs back to back
    P = sum(lens) + 1
    k_cache, v_cache = (rows[torch.randperm(P) % 4096] for _ in "kv")  # [P, Hkv, D]
    q = torch.randn(B, Hq, D, generator=g).bfloat16()
    k, v = (torch.randn(B, Hkv, D, generator=g).bfloat16() for _ in "kv")
    if shared:
        v_cache, v = k_cache, k
    starts = torch.tensor(lens, dtype=torch.int32) - 1
    out = torch.empty(B, Hq, D, dtype=torch.bfloat16)
    native(q, k_cache, v_cache, runs, starts, None, threads, k, v, out, kernel)  # warm: pages, threads
    t = time.perf_counter()
    for _ in range(repeat):
        native(q, k_cache, v_cache, runs, starts, None, threads, k, v, out, kernel)
    s = (time.perf_counter() - t) / repeat
    nbytes = (1 if shared else 2) * sum(lens) * Hkv * D * 2
    return {"B": B, "ctx": ctx, "Hq": Hq, "Hkv": Hkv, "D": D, "shared": shared, "threads": threads,
            "kernel": kernel or native.best(), "ms": s * 1e3, "kv_bytes": nbytes, "gb_per_s": nbytes / s / 1e9,
            "gflop_per_s": 4 * sum(lens) * Hq * D / s / 1e9}


def beside_copies(fn, nbytes: int = 1 << 30) -> tuple[object, float]:
    """fn() while host -> GPU copies of a pinned nbytes buffer run back to back: (its result, copy bytes/s)."""
    import threading

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stop, copied = threading.Event(), [0]

    def copies():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dst.copy_(src, non_blocking=True)
                stream.synchronize()
                copied[0] += nbytes

    th = threading.Thread(target=copies)
    th.start()
    t = time.perf_counter()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, copied[0] / (time.perf_counter() - t)


@cache
def measured_read_bw(Hq: int, Hkv: int, D: int, threads: int, shared: bool = False) -> float | None:
    """The kernel's K/V read rate (bytes/s) alone on 256 sequences of 256 to 768 positions (at Mixtral's shape
    ~0.5 GiB, beyond the caches; where the heads' arithmetic binds, as for MLA's latent rows, that shows in the
    rate); None where it cannot be built. Taken once per process, for the planner."""
    if load() is None:
        return None
    return bench(256, 512, Hq, Hkv, D, threads, 3, shared=shared)["gb_per_s"] * 1e9


@cache
def measured_call_s(Hq: int, Hkv: int, D: int, threads: int, repeat: int = 50) -> float:
    """The fixed part of a micro-batch's attention call as the pipeline makes it (the wrapper, the kernel's threads
    woken): median seconds of a call on a sequence per thread, each at its first position (PyTorch's where the
    kernel cannot be built). Taken once per process, for the planner."""
    from moeflow.perf.costs import median_s
    from moeflow.pipeline.attention import cpu_decode_attention

    B = max(threads, 1)
    q, out = torch.zeros(B, Hq, D).bfloat16(), torch.empty(B, Hq, D).bfloat16()
    k, v, k_cache, v_cache = (torch.zeros(B, Hkv, D).bfloat16() for _ in range(4))
    runs, starts = list(range(B)), [0] * B
    return median_s(lambda: cpu_decode_attention(q, k, v, k_cache, v_cache, runs, starts, None, load(), threads, out),
                    lambda: None, repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=448)
    p.add_argument("--ctx", type=int, default=236, help="average attended positions")
    p.add_argument("--heads", default="32,8,128", help="Hq,Hkv,D (DeepSeek-V2-Lite's latent rows: 16,1,576 --shared)")
    p.add_argument("--shared", action="store_true", help="K and V one arena (MLA's latent rows)")
    p.add_argument("--threads", default=str(physical_cores()), help="comma-separated thread counts")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--kernel", choices=tuple(KERNELS))
    p.add_argument("--beside-copies", action="store_true", help="also with host -> GPU copies running (CUDA)")
    a = p.parse_args()
    Hq, Hkv, D = (int(x) for x in a.heads.split(","))
    for n in (int(x) for x in a.threads.split(",")):
        print(json.dumps(bench(a.batch, a.ctx, Hq, Hkv, D, n, a.repeat, a.kernel, shared=a.shared)))
        if a.beside_copies and torch.cuda.is_available():
            row, h2d = beside_copies(lambda: bench(a.batch, a.ctx, Hq, Hkv, D, n, a.repeat, a.kernel, shared=a.shared))
            print(json.dumps(row | {"beside_copies_h2d_gb_per_s": h2d / 1e9}))


if __name__ == "__main__":
    main()
