"""One int4 expert at decode token counts: the GEMV kernels against the tiled (tl.dot) ones of quant/triton_int4.py.

Per shape (int4-g64, symmetric, bf16 scales and activations) and token count, both paths forced (gemv=True /
False, the GEMVs past GEMV_MAX_TOKENS too, to show where they cross): the median GPU time of one expert (CUDA
events, the calls queued behind a sleep so launches do not pace them), GB/s of the packed block, the wall time a
call with the host's launches (perf_counter over a batch, one synchronize), the ratio gemv / tiled, and the
error against the PyTorch fallback (max |got - want| / max |want|). Distinct experts in turn, twice L2 in all,
so the weights come from HBM. --sweep: the GEMV's step bytes and programs on the first shape (slower: a compile
a config).
    PYTHONPATH=src python3 scripts/probes/int4_gemv.py [--shapes mixtral,qwen3] [--tokens 1,4] [--sweep]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moeflow.experts.local import partial_ffn
from moeflow.quant import triton_int4
from moeflow.quant.format import ExpertFormat, QuantSpec

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768), "deepseek": (2048, 1408), "gpt-oss": (2880, 2880)}
SLEEP_CYCLES = 20_000_000  # ~10 ms at H100 clocks: longer than the host takes to queue a batch of calls

p = argparse.ArgumentParser()
p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
p.add_argument("--tokens", default="1,2,4,8")
p.add_argument("--calls", type=int, default=50, help="timed calls a measurement")
p.add_argument("--sweep", action="store_true", help="also time GEMV_STEP_BYTES x GEMV_PROGRAMS on the first shape")
a = p.parse_args()
DEV, DT = torch.device("cuda"), torch.bfloat16


def experts(H: int, I: int) -> tuple[ExpertFormat, torch.Tensor]:
    """Random experts packed int4-g64, as many as fill twice the L2 (8 at least): [nb, block bytes]."""
    fmt = ExpertFormat(I, H, DT, QuantSpec(4, 64))
    l2 = getattr(torch.cuda.get_device_properties(DEV), "L2_cache_size", 50 << 20)
    nb = max(8, -(-2 * l2 // fmt.block_bytes))
    blocks = torch.empty(nb, fmt.block_numel, dtype=torch.uint8, device=DEV)
    for b in blocks:
        fmt.pack(*(torch.randn(I, H, device=DEV) * 0.02 for _ in range(3)), b)
    return fmt, blocks


def gpu_us(call, nb: int) -> float:
    """Median GPU time of one call, us: warmed up, then a.calls calls queued behind a sleep."""
    for i in range(3):
        call(i % nb)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.calls)]
    torch.cuda._sleep(SLEEP_CYCLES)
    for i, (start, end) in enumerate(events):
        start.record()
        call(i % nb)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def wall_us(call, nb: int) -> float:
    """Host wall time a call, us, over a batch with one synchronize at the end: launch overhead included."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(a.calls):
        call(i % nb)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / a.calls * 1e6


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def measure(fmt, blocks, x, gemv: bool) -> tuple[float, float, float]:
    """(GPU us, wall us, error) of int4_ffn on x, one path."""
    def call(i):
        return triton_int4.int4_ffn(x, blocks[i], fmt, gemv=gemv)
    want = partial_ffn(x, *fmt.rows(blocks[0], 0, fmt.inter, x.dtype)).float()
    err = max_err(call(0), want)
    return gpu_us(call, len(blocks)), wall_us(call, len(blocks)), err


def shape_rows(name: str, tokens: list[int]) -> None:
    H, I = SHAPES[name]
    fmt, blocks = experts(H, I)
    mb = fmt.block_bytes / 1e6
    print(f"{name}: H {H} I {I} int4-g64, {mb:.1f} MB an expert, {len(blocks)} experts in turn; "
          f"gemv blocks (NG, gate_up rows, down chunk) {triton_int4.gemv_blocks(H, I, 64)}", flush=True)
    for n in tokens:
        x = torch.randn(n, H, device=DEV, dtype=DT)
        (g_us, g_wall, g_err), (t_us, t_wall, t_err) = (measure(fmt, blocks, x, gemv) for gemv in (True, False))
        print(f"  tokens {n}: gemv {g_us:7.1f} us {mb * 1e3 / g_us:5.0f} GB/s (wall {g_wall:6.1f} us, err "
              f"{g_err:.1e}) | tiled {t_us:7.1f} us {mb * 1e3 / t_us:5.0f} GB/s (wall {t_wall:6.1f} us, err "
              f"{t_err:.1e}) | gemv/tiled {g_us / t_us:.2f}", flush=True)


def sweep(name: str) -> None:
    """GPU us of the GEMV path on one shape per (step bytes, programs), tokens 1 and 4."""
    H, I = SHAPES[name]
    fmt, blocks = experts(H, I)
    saved = triton_int4.GEMV_STEP_BYTES, triton_int4.GEMV_PROGRAMS
    for step in (128, 256, 512):
        for programs in (256, 512, 1024, 2048):
            triton_int4.GEMV_STEP_BYTES, triton_int4.GEMV_PROGRAMS = step, programs
            us = [measure(fmt, blocks, torch.randn(n, H, device=DEV, dtype=DT), True)[0] for n in (1, 4)]
            print(f"  sweep {name} step {step:3d} B programs {programs:4d} "
                  f"{triton_int4.gemv_blocks(H, I, 64)}: tokens 1 {us[0]:6.1f} us, 4 {us[1]:6.1f} us", flush=True)
    triton_int4.GEMV_STEP_BYTES, triton_int4.GEMV_PROGRAMS = saved


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("int4_gemv.py: needs a CUDA GPU (the Triton kernels run there only)")
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name(DEV)}; GEMV_MAX_TOKENS {triton_int4.GEMV_MAX_TOKENS}", flush=True)
    shapes = a.shapes.split(",")
    for name in shapes:
        shape_rows(name, [int(t) for t in a.tokens.split(",")])
    if a.sweep:
        sweep(shapes[0])
    print(f"done in {time.perf_counter() - t0:.0f} s (compiles included)", flush=True)


if __name__ == "__main__":
    main()
