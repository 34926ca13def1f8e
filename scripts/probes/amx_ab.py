"""Side by side on one host: the AMX path's weight-reading modes (moe_amx_prefetch: 0 weights copied into tiles
slice by slice, 1 the same with software prefetches of the next slice, a few lines per k-step, 2 as 1 with
gate/up's tiles loaded straight from the weights), interleaved call by call so the host's drift (its read
ceiling moved 85-119 GB/s between runs of one call) hits every mode alike.
One call = one Mixtral layer (K experts, n tokens each), the next K experts of a >1 GB pool each time.

    PYTHONPATH=src python3 scripts/probes/amx_ab.py --tokens 16,64,256 --modes 0,1,2 --reps 15 --out ab.json

First the tile units' own rate (moe_amx_peak): dot products alone, then with operand loads from an L1- or L2-sized
buffer (1: four loads before four products; 2: the kernel's order; 3: also its sums stored and reloaded every 16
steps). Then per token count each mode's median ms and TFLOP/s, and the median of the per-round ratios to the
first mode.
"""

import argparse
import json
import statistics
import time

import torch

from moeflow.bench.cpu_experts import SHAPES, random_pool
from moeflow.experts.cpu import CpuExperts

p = argparse.ArgumentParser()
p.add_argument("--shape", default="mixtral")
p.add_argument("--tokens", default="16,64,256")
p.add_argument("--modes", default="0,1,2")
p.add_argument("--reps", type=int, default=15)
p.add_argument("--out")
a = p.parse_args()

shape = SHAPES[a.shape]
modes = [int(m) for m in a.modes.split(",")]
ce = CpuExperts(kernel="amx")
ce.torch_from_tokens = 0
assert ce.kernel == "amx", f"needs the AMX kernel (got {ce.kernel})"
default = ce.native.amx_prefetch()  # put back at the end
turn, result = 0, {"shape": shape.name, "threads": ce.threads, "rows": []}
peaks = {}
for threads in (1, ce.threads):
    for loads, span in ((0, 4096), (1, 32 << 10), (1, 1 << 20), (2, 32 << 10), (2, 1 << 20), (3, 32 << 10),
                        (3, 1 << 20)):
        key = f"threads {threads}, " + ("no loads" if not loads else f"loads ({loads}) from {span >> 10} KiB")
        peaks[key] = ce.native.amx_peak(threads, loads, span) / 1e12
        print(f"AMX peak, {key}: {peaks[key]:.2f} TFLOP/s", flush=True)
result["amx_peak_tflops"] = peaks
data = random_pool(shape)
K = shape.top_k
for n in (int(t) for t in a.tokens.split(",")):
    x = torch.randn(n, shape.hidden).bfloat16()
    w = torch.full((n, K), 1.0 / K)
    times: dict[int, list[float]] = {m: [] for m in modes}
    for rep in range(a.reps + 1):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]  # each mode first in turn
        for m in order:
            ce.native.amx_prefetch(m)
            ids = (torch.arange(turn, turn + K) % shape.pool).expand(n, -1)
            turn += K
            t = time.perf_counter()
            ce.layer(data, x, ids, w)
            if rep:  # the first round warms up
                times[m].append(time.perf_counter() - t)
    flops = 2 * 3 * shape.hidden * shape.inter * n * K
    base = times[modes[0]]
    for m in modes:
        med = statistics.median(times[m])
        ratio = statistics.median(b / t for b, t in zip(base, times[m]))  # > 1: faster than the first mode
        row = {"tokens": n, "mode": m, "ms_layer": med * 1e3, "tflops": flops / med / 1e12,
               f"speed_vs_mode{modes[0]}": ratio, "ms_all": [t * 1e3 for t in times[m]]}
        result["rows"].append(row)
        print(f"tokens {n:4d} mode {m}: {med * 1e3:7.2f} ms/layer, {row['tflops']:.3f} TFLOP/s, "
              f"speed against mode {modes[0]} x{ratio:.3f}", flush=True)
ce.native.amx_prefetch(default)
if a.out:
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
