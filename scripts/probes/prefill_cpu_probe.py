"""What a prefill's CPU call costs per expert (on the GPU host): m experts of n tokens each, taken from a
prompt of N tokens, in one call of the engine's CPU kernel, against one expert of n tokens alone (the
profile's measurement). Prints per call and per expert (ms, medians), and the marginal expert (t_m - t_1) /
(m - 1), inline and handed over (the engine's way), alone and beside queued copies.

Usage: PYTHONPATH=src python scripts/probes/prefill_cpu_probe.py [--shape qwen3-30b-a3b] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import moeflow  # noqa: F401  (first: its OpenMP setting holds only where it comes before torch)
import torch

from cpu_cost_probe import locked_experts  # this folder's: scripts run as `python scripts/NAME.py`
from moeflow.experts.cpu import Job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--experts", type=int, default=64, help="host experts rotated through")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    data, cpu, H, I = locked_experts(a.shape, a.experts)
    E, numel, cuda = a.experts, data.shape[1], torch.cuda.is_available()
    print({"shape": a.shape, "H": H, "I": I, "kernel": cpu.kernel, "threads": cpu.threads, "experts": E}, flush=True)
    x = torch.randn(a.prompt, H)
    turn = iter(range(1 << 30))
    slot = torch.empty(numel, dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    stream = torch.cuda.Stream() if cuda else None
    gen = torch.Generator().manual_seed(0)

    def jobs(m, n):  # made before the timed calls: a pool of calls, each its own experts and tokens
        pool = [[Job(next(turn) % E, torch.randperm(a.prompt, generator=gen)[:n].tolist(), [1.0] * n)
                 for _ in range(m)] for _ in range(64)]
        it = iter(range(1 << 30))
        return lambda: pool[next(it) % len(pool)]

    def copy():
        if cuda:
            with torch.cuda.stream(stream):
                slot.copy_(data[next(turn) % E], non_blocking=True)

    def timed(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if cuda:
            torch.cuda.synchronize()
        return statistics.median(ts) * 1e3

    print(f"{'way':8s} {'n':>3s} " + " ".join(f"{'m=' + str(m):>8s}" for m in (1, 4, 8)) + "   marginal(4) marginal(8)")
    for way in ("inline", "handed", "copies"):
        for n in (1, 2, 4, 8, 16):
            row = {}
            for m in (1, 4, 8):
                call = jobs(m, n)
                if way == "inline":
                    row[m] = timed(lambda: cpu(data, x, call()))
                elif way == "handed":
                    row[m] = timed(lambda: cpu.submit(data, x, call(), spin=1 << 18).result())
                else:
                    row[m] = timed(lambda: (copy(), cpu.submit(data, x, call(), spin=1 << 18).result()))
            print(f"{way:8s} {n:3d} " + " ".join(f"{row[m]:8.3f}" for m in (1, 4, 8)) +
                  f"   {(row[4] - row[1]) / 3:9.3f} {(row[8] - row[1]) / 7:11.3f}", flush=True)
    if cuda:
        torch.cuda.cudart().cudaHostUnregister(data.data_ptr())


if __name__ == "__main__":
    main()
