"""Why the profile's CPU expert times differ from the engine's (on the GPU host): one Mixtral-shape expert at
1 token timed in the ways the profile, host_memory.py and the engine time it.

Each variant prints the median and the spread (ms) of its calls:
  inline      CpuExperts.__call__ with fp32 x, rotating through E experts (host_memory.py's loop)
  expert      CpuExperts.expert with bf16 x (the profile's cpu_ffn: a few PyTorch ops around the kernel)
  gap         inline with a 1 ms pause between calls (the threads go idle, as between the engine's layers)
  copy-queued inline, each call first queuing one expert's copy, never waited for (measure_costs' way)
  copy-paired inline beside one copy started with it, both waited for (the engine's layer)
  many4       four experts in one call (per expert)
  handed      submit(...).result(): the native hand-over the engine uses
  inline16..  16 and 64 tokens: alone, through expert(), beside queued copies, both
then measure_costs on the same store, twice, as the profile calls it.

Usage: PYTHONPATH=src python scripts/probes/cpu_cost_probe.py [--experts 16] [--reps 12] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import moeflow  # noqa: F401  (first: its OpenMP setting holds only where it comes before torch)
import torch

from moeflow.experts.cpu import CpuExperts, Job, default_threads
from moeflow.experts.local import block_ffn
from moeflow.perf.costs import measure_costs
from moeflow.synthetic import PRESETS


def spread(name: str, times: list[float], per: int = 1) -> None:
    ms = sorted(t * 1e3 / per for t in times)
    print(f"{name:12s} median {statistics.median(ms):6.2f}  min {ms[0]:6.2f}  max {ms[-1]:6.2f}  "
          f"(ms per expert, {len(ms)} calls)", flush=True)


def locked_experts(shape: str, n: int) -> tuple[torch.Tensor, CpuExperts, int, int]:
    """n random experts of a preset's shape, page-locked where CUDA is (as the engine's store is), and the
    engine's CPU backend with its threads: (data [n, 3IH] bf16, cpu, H, I)."""
    cfg = PRESETS[shape]
    H = cfg["hidden_size"]
    I = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    data = torch.empty(n, 3 * I * H, dtype=torch.bfloat16)
    data.normal_(0, 0.02)
    cuda = torch.cuda.is_available()
    if cuda:
        assert int(torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel() * 2, 0)) == 0
    return data, CpuExperts(threads=default_threads(reserve=1 if cuda else 0)), H, I


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads first (0: leave)")
    a = ap.parse_args()
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    data, cpu, H, I = locked_experts("mixtral-8x7b", a.experts)
    E, numel, cuda = a.experts, data.shape[1], torch.cuda.is_available()
    print({"kernel": cpu.kernel, "threads": cpu.threads, "torch_threads": torch.get_num_threads(), "experts": E})
    xf, xb = torch.randn(1, H), torch.randn(1, H, dtype=torch.bfloat16)
    turn = iter(range(1 << 30))
    dev = torch.device("cuda" if cuda else "cpu")
    slot = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    stream = torch.cuda.Stream() if cuda else None

    def copy():
        if cuda:
            with torch.cuda.stream(stream):
                slot.copy_(data[next(turn) % E], non_blocking=True)

    def run(name, fn, per=1, gap=0.0, after=lambda: None):
        for _ in range(E):  # a round to warm up
            fn()
        after()
        times = []
        for _ in range(a.reps):
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            fn()
            after()
            times.append(time.perf_counter() - t)
        spread(name, times, per)

    one = lambda: cpu(data, xf, [Job(next(turn) % E, [0], [1.0])])  # noqa: E731
    run("inline", one)
    run("expert", lambda: cpu.expert(xb, data[next(turn) % E]))
    run("gap", one, gap=1e-3)
    run("copy-queued", lambda: (copy(), one()))
    run("copy-paired", lambda: (copy(), one()), after=lambda: stream.synchronize() if cuda else None)
    run("many4", lambda: cpu(data, xf, [Job((next(turn) * 4 + k) % E, [0], [1.0]) for k in range(4)]), per=4)
    run("handed", lambda: cpu.submit(data, xf, [Job(next(turn) % E, [0], [1.0])]).result())
    for n in (16, 64):  # the AMX path: alone, beside queued copies, and through expert() (PyTorch ops around it)
        xn, xnb, out = torch.randn(n, H), torch.randn(n, H, dtype=torch.bfloat16), torch.zeros(n, H)
        many = lambda: cpu(data, xn, [Job(next(turn) % E, list(range(n)), [1.0] * n)], out)  # noqa: E731
        run(f"inline{n}", many)
        run(f"expert{n}", lambda: cpu.expert(xnb, data[next(turn) % E]))
        run(f"queued{n}", lambda: (copy(), many()))
        run(f"queued-exp{n}", lambda: (copy(), cpu.expert(xnb, data[next(turn) % E])))
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.synchronize()
        for _ in range(2):
            c = measure_costs(lambda i: data[i], I, H, E, slot, cpu.expert, block_ffn(I), 5,
                              copy_stream=stream, cpu_many=(4, cpu.many(4, data)))
            print("measure_costs cpu_s", [round(t * 1e3, 2) for t in c.cpu_s], "fixed", round(c.cpu_fixed_s * 1e3, 2),
                  "alone", round(c.cpu_alone, 3), "copy", round(c.copy_s * 1e3, 2), flush=True)
        torch.cuda.cudart().cudaHostUnregister(data.data_ptr())


if __name__ == "__main__":
    main()
