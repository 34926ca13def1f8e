"""`moeflow bench cpu-experts`: one MoE layer's experts on the CPU (native kernel and PyTorch bf16) against
the measured memory-read ceiling, by tokens per expert, at published expert shapes with random weights.

A call is one layer: K experts, each on the same n tokens (decode: n = 1). Successive calls take the next
K experts of a pool larger than 1 GB, so the weights come from memory, not the last-level cache.
Per-expert overhead: (layer time - K x expert bytes / ceiling) / K, what a call costs beyond streaming.
Where AMX runs, AVX512-BF16 is measured too (--amx-min-tokens moves the crossover between them). The kernel's
settings come from CpuKernelConfig flags; --variants measures several settings side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from moeflow import MoeflowError
from moeflow.bench.ceilings import concurrent_host_read, cpu_read_ceiling
from moeflow.config import CpuKernelConfig
from moeflow.experts.cpu import CpuExperts
from moeflow.experts.native import cpu_flags
from moeflow.perf.profile import cpu_model
from moeflow.quant.format import ExpertFormat

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    top_k: int
    pool: int  # experts allocated (rotated through)

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.inter * 2


SHAPES = {
    "mixtral": Shape("mixtral-8x7b", 4096, 14336, 2, 4),       # 4 x 352 MB
    "qwen3": Shape("qwen3-30b-a3b", 2048, 768, 8, 128),        # one layer: 128 x 9.4 MB
}


def random_pool(shape: Shape, seed: int = 0) -> torch.Tensor:
    """[pool, 3IH] bf16, tiled from one random block (fast to make; values like trained weights')."""
    g = torch.Generator().manual_seed(seed)
    numel = 3 * shape.hidden * shape.inter
    block = (torch.randn(1 << 22, generator=g) / shape.hidden**0.5).bfloat16()
    data = torch.empty(shape.pool, numel, dtype=torch.bfloat16)
    flat = data.view(-1)
    for s in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - s)
        flat[s:s + n].copy_(block[:n])
    return data


def time_layer(ce: CpuExperts, data: torch.Tensor, shape: Shape, n: int, reps: int) -> tuple[float, list]:
    """Median seconds of one layer call (K experts, n tokens each), rotating through the pool, and the native
    kernel's phases (preparation, gate/up, down) in that call. One turn through the pool warms up first: every
    expert read once before the clock runs."""
    x = torch.randn(n, shape.hidden).bfloat16()
    w = torch.full((n, shape.top_k), 1.0 / shape.top_k)
    warm = -(-shape.pool // shape.top_k)
    turn, times = 0, []
    for i in range(reps + warm):
        ids = (torch.arange(turn, turn + shape.top_k) % shape.pool).expand(n, -1)  # every token, the same K
        turn += shape.top_k
        t = time.perf_counter()
        ce.layer(data, x, ids, w)
        if i >= warm:
            phases = list(ce.native.last_phases()) if ce.uses_native(data) else []
            times.append((time.perf_counter() - t, phases))
    return sorted(times)[len(times) // 2]


def quantized_pool(shape: Shape, quant) -> tuple[torch.Tensor, ExpertFormat]:
    """random_pool's experts quantized ([pool, block] uint8) and their format."""
    fmt = ExpertFormat(shape.inter, shape.hidden, torch.bfloat16, quant)
    dense = random_pool(shape)
    data = torch.empty(shape.pool, fmt.block_numel, dtype=torch.uint8)
    for i in range(shape.pool):
        fmt.pack(*dense[i].view(3, shape.inter, shape.hidden), data[i])
    return data, fmt


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """CpuKernelConfig's fields as flags of `bench cpu-experts` (--threads and --kernel are the command's own)."""
    d = CpuKernelConfig()
    p.add_argument("--amx-min-tokens", type=int, help="fewest tokens of an expert on the AMX tiles (default 16)")
    p.add_argument("--gemv-rows", type=int, default=d.gemv_rows, help="AVX-512, <= 8 tokens: gate/up rows per pass")
    p.add_argument("--prefetch", type=int, default=d.prefetch, help="vector path: prefetch bytes ahead (0: none)")
    p.add_argument("--down-direct", action="store_true", help="vector path, <= 8 tokens: down in registers")
    p.add_argument("--quant-avx512", action="store_true", help="int4/int8 on the AVX-512 code (else AVX2)")
    p.add_argument("--int4-bf16", action="store_true", help="with --quant-avx512, int4 (groups of 64k): vdpbf16ps")
    p.add_argument("--pin", action="store_true", help="pin the kernel's workers, one per core")
    p.add_argument("--spin", type=int, default=d.spin, help="pause iterations idle workers spin before sleeping")
    p.add_argument("--variants", help="more settings measured side by side: ';'-separated 'field=value,...' "
                   "(e.g. 'gemv_rows=2;gemv_rows=4,prefetch=1024,pin=1')")


def kernel_config(args: argparse.Namespace) -> CpuKernelConfig:
    return CpuKernelConfig(kernel=args.kernel or "auto", threads=args.threads, amx_min_tokens=args.amx_min_tokens,
                           gemv_rows=args.gemv_rows, prefetch=args.prefetch, down_direct=args.down_direct,
                           quant_avx512=args.quant_avx512, int4_bf16=args.int4_bf16, pin=args.pin, spin=args.spin)


def parse_variants(text: str | None, base: CpuKernelConfig) -> list[tuple[str, CpuKernelConfig]]:
    """'gemv_rows=2;prefetch=512,pin=1' -> [(label, base with those fields)]."""
    kinds = {f.name: f.type for f in fields(CpuKernelConfig)}
    out = []
    for part in filter(None, (text or "").split(";")):
        changes = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if key not in kinds or key in ("kernel", "amx_blocking") or not value.lstrip("-").isdigit():
                raise MoeflowError(f"--variants: {item!r} is not field=<integer> of a kernel setting")
            changes[key] = value.lower() in ("1", "true", "yes") if "bool" in str(kinds[key]) else int(value)
        out.append((part, replace(base, **changes)))
    return out


def bench_cpu_experts(shapes: list[str], tokens: list[int], reps: int, threads: int | None, kernel: str = "auto",
                      torch_max_tokens: int = 256, quant=None, config: CpuKernelConfig | None = None,
                      variants: list[tuple[str, CpuKernelConfig]] = ()) -> dict:
    """quant: a QuantSpec: its experts through the quantized path (GB/s of packed weights) instead. config: the
    kernel's settings; variants: (label, config) measured beside it."""
    if threads:
        torch.set_num_threads(threads)
    config = config or CpuKernelConfig()
    native = CpuExperts(threads=threads, kernel=kernel, config=config)
    if native.kernel == "torch":
        print("moeflow: no native kernel here (see the warning above): only PyTorch is measured")
    readers = cpu_read_ceiling()
    ceiling = max(readers.values())
    flags = cpu_flags()
    meta = {"host": platform.node(), "cpu": cpu_model(), "kernel": native.kernel, "threads": native.threads,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_read_gbps": ceiling / 1e9, "cpu_read_gbps_by_reader": {k: v / 1e9 for k, v in readers.items()},
            "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16",
                                                                    "amx_tile", "amx_bf16"}),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if native.kernel == "amx":  # the tile units' ceiling: products alone, and fed as the kernel feeds them from L2
        meta["amx_peak_tflops"] = native.native.amx_peak(native.threads) / 1e12
        meta["amx_fed_tflops"] = native.native.amx_peak(native.threads, loads=3, span=1 << 20) / 1e12
    by_reader = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in readers.items())
    print(f"CPU read ceiling {ceiling / 1e9:.1f} GB/s (best of {by_reader}); "
          f"native kernel {native.kernel} on {native.threads} threads; "
          f"PyTorch on {torch.get_num_threads()} threads" + (
              f"; AMX {meta['amx_peak_tflops']:.1f} TFLOP/s alone, {meta['amx_fed_tflops']:.1f} fed from L2"
              if "amx_peak_tflops" in meta else ""))
    meta["config"] = repr(config)
    if torch.cuda.is_available():  # the share of host memory the CPU keeps while copies to the GPU run beside it
        both = concurrent_host_read(torch.device("cuda"))
        meta |= {k: v / 1e9 for k, v in both.items()}
        print(f"beside host->GPU copies: CPU reads {both['cpu_read_bw_concurrent'] / 1e9:.1f} GB/s "
              f"({both['cpu_read_bw_concurrent'] / ceiling:.0%} of its ceiling), copies "
              f"{both['h2d_bw_concurrent'] / 1e9:.1f} GB/s")
    backends = [("native:" + native.kernel, native)] if native.kernel != "torch" else []
    if native.kernel == "amx":  # the vector path beside it: where the tiles start to pay
        backends.append(("native:avx512", CpuExperts(threads=threads, kernel="avx512", config=config)))
    if native.kernel != "torch":
        backends += [(f"{native.kernel}[{label}]", CpuExperts(threads=threads, kernel=native.kernel, config=cfg))
                     for label, cfg in variants]
    backends.append(("torch", CpuExperts(kernel="torch")))
    rows = []
    print_row(None)
    for key in shapes:
        shape = SHAPES[key]
        data, fmt = quantized_pool(shape, quant) if quant else (random_pool(shape), None)
        runs = backends if fmt is None else [  # the same backends on the quantized blocks (PyTorch dequantizes)
            (f"{name}:{quant.name}", CpuExperts(threads=ce.threads, kernel=ce.kernel, fmt=fmt, config=ce.config))
            for name, ce in backends]
        for name, ce in runs:
            for n in tokens:
                if name.startswith("torch") and n > torch_max_tokens:
                    continue
                t, phases = time_layer(ce, data, shape, n, reps)
                K, nbytes = shape.top_k, shape.top_k * (fmt.block_bytes if fmt else shape.expert_bytes)
                rows.append({"shape": shape.name, "backend": name, "tokens_per_expert": n, "experts": K,
                             "ms_layer": t * 1e3, "ms_expert": t * 1e3 / K, "gbps": nbytes / t / 1e9,
                             "tflops": 2 * 3 * shape.hidden * shape.inter * n * K / t / 1e12,
                             "frac_ceiling": nbytes / ceiling / t,
                             "overhead_us_per_expert": (t - nbytes / ceiling) / K * 1e6,
                             "phases_ms": [p * 1e3 for p in phases]})  # preparation, gate/up, down
                print_row(rows[-1])
        del data
    return {"meta": meta, "rows": rows}


def print_row(r: dict | None) -> None:
    if r is None:
        print(f"{'shape':14s} {'backend':16s} {'tok/exp':>7s} {'ms/layer':>9s} {'ms/exp':>8s} {'GB/s':>7s} "
              f"{'TFLOP/s':>8s} {'ceiling':>7s} {'ovh us/exp':>10s}  phases ms (prep / gate-up / down)")
        return
    print(f"{r['shape']:14s} {r['backend']:16.40s} {r['tokens_per_expert']:7d} {r['ms_layer']:9.2f} "
          f"{r['ms_expert']:8.2f} {r['gbps']:7.1f} {r['tflops']:8.3f} {r['frac_ceiling']:7.0%} "
          f"{r['overhead_us_per_expert']:10.0f}  " + " / ".join(f"{p:.2f}" for p in r["phases_ms"]), flush=True)


def save(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def plot(result: dict, path: str | Path) -> None:
    """GB/s of weights and TFLOP/s by tokens per expert, one row of plots per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ceiling = result["rows"], result["meta"]["cpu_read_gbps"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.6 * len(shapes)), squeeze=False)
    for (ax_bw, ax_fl), shape in zip(axes, shapes):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["backend"] == backend]
            n = [r["tokens_per_expert"] for r in sel]
            ax_bw.plot(n, [r["gbps"] for r in sel], "o-", label=backend)
            ax_fl.plot(n, [r["tflops"] for r in sel], "o-", label=backend)
        ax_bw.axhline(ceiling, color="gray", ls="--", label=f"memory read {ceiling:.0f} GB/s")
        for ax, label in ((ax_bw, "GB/s of weights"), (ax_fl, "TFLOP/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per expert")
            ax.set_ylabel(label)
            ax.set_title(shape)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"{m['cpu']}: {m['kernel']} on {m['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
