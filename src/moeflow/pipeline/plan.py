"""The pipeline's plan (N, mu, r_w, r_c, attention): from `--plan` or chosen by the throughput model, and its memory
checked against the GPU budget and host memory before any weight is loaded."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from moeflow import MoeflowError
from moeflow.config import ModelConfig
from moeflow.engine.budget import gib
from moeflow.perf.profile import HardwareProfile, _host_memory, cached_profile, reference_profile
from moeflow.perf.throughput_model import (PipelineRates, ThroughputPolicy, ThroughputPrediction,
                                           host_staging_bytes, layer_expert_bytes, predict_throughput,
                                           throughput_memory)
from moeflow.perf.search import HOST_SHARE, _grid, _max_rw

def parse_plan(text: str) -> ThroughputPolicy:
    """`N,mu,r_w,r_c,attn` (attn: cpu or gpu), e.g. 64,16,0.3,0,cpu."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 5 or parts[4] not in ("cpu", "gpu"):
            raise ValueError
        pol = ThroughputPolicy(int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3]), parts[4] == "gpu")
    except ValueError:
        raise MoeflowError(f"--plan {text!r}: expected N,mu,r_w,r_c,attn (e.g. 64,16,0.3,0,cpu)") from None
    if pol.N < 1 or not 1 <= pol.mu <= pol.N or not 0 <= pol.r_w <= 1 or not 0 <= pol.r_c <= 1:
        raise MoeflowError(f"--plan {text!r}: needs N >= 1, 1 <= mu <= N, r_w and r_c in [0, 1]")
    return pol


def machine_profile() -> HardwareProfile:
    return cached_profile() or reference_profile()


HOST_MARGIN = 2 << 30        # what no plan itemizes: the CUDA context's host side, Python's heap, allocator slack
HOST_MARGIN_SHARE = 0.03     # and a share of the host on top


def host_available() -> int:
    """Host bytes the OS could give this process now (MemAvailable: free plus reclaimable page cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(_host_memory() * HOST_SHARE)


def host_budget(held: int = 0) -> int:
    """Host bytes a plan may use: what is available now plus what this process already holds for the plan
    (held: a store loaded before planning), less a margin."""
    return int(host_available() + held - HOST_MARGIN - HOST_MARGIN_SHARE * _host_memory())


def max_sequences(cfg: ModelConfig, host: int, prompt_len: int, gen_len: int, b: int = 2,
                  eb: int | None = None) -> int:
    """The most sequences whose host KV runs fit beside the experts (blocks of eb bytes, default dense in b) in
    `host` bytes (0 if none)."""
    experts = len(cfg.moe_layers) * layer_expert_bytes(cfg, b, eb)
    per_seq = (prompt_len + gen_len) * cfg.kv_bytes_per_token(b)
    room = host - experts - host_staging_bytes(cfg, 1, prompt_len, b)
    n = max(0, room // per_seq)
    while n > 0 and throughput_memory(cfg, ThroughputPolicy(n, 1, 0.0, 0.0, False), prompt_len, gen_len, b,
                                      eb)[1] > host:
        n -= 1
    return n


def choose_plan(cfg: ModelConfig, profile: HardwareProfile, gpu_memory: int, prompt_len: int, gen_len: int,
                b: int = 2, max_n: int | None = None, host: int | None = None,
                rates: PipelineRates = PipelineRates(), eb: int | None = None) -> ThroughputPrediction:
    """The fastest plan with attention on the CPU (what the pipeline runs) that fits GPU and host memory, of at
    most max_n sequences, each with a host KV run of prompt_len + gen_len positions. host: bytes usable
    (default host_budget()); rates: the pipeline's kernels measured (predict_throughput); eb: an expert's block
    bytes (a quantized format's; default dense in b)."""
    host = host_budget() if host is None else host
    best = None
    for N in _grid(max(1, min(max_sequences(cfg, host, prompt_len, gen_len, b, eb), max_n or 1 << 30))):
        top = max(1, -(-N // 2))  # at least two micro-batches, so that CPU and GPU overlap
        for mu in sorted({min(2**i, top) for i in range(int(math.log2(top)) + 2)}):
            pol = ThroughputPolicy(N, mu, 0.0, 0.0, False)
            r_w = _max_rw(cfg, pol, prompt_len, gen_len, gpu_memory, b, eb)
            if r_w is None or throughput_memory(cfg, pol, prompt_len, gen_len, b, eb)[1] > host:
                continue
            r_w = math.floor(r_w * cfg.num_experts + 1e-9) / cfg.num_experts  # whole experts stay resident
            pred = predict_throughput(cfg, profile, replace(pol, r_w=r_w), prompt_len, gen_len, b, rates, eb)
            if best is None or pred.tokens_per_s > best.tokens_per_s:
                best = pred
    if best is None:
        check_fits(cfg, ThroughputPolicy(1, 1, 0.0, 0.0, False), prompt_len, gen_len, gpu_memory, b, host, eb)
        raise MoeflowError(f"no pipeline plan fits {gib(gpu_memory)} of GPU and {gib(host)} of host memory")
    return best


def check_fits(cfg: ModelConfig, pol: ThroughputPolicy, prompt_len: int, gen_len: int, gpu_memory: int | None,
               b: int = 2, host: int | None = None, eb: int | None = None) -> None:
    """Refuse, with what does not fit and by how much, a plan beyond the GPU budget or the host's memory
    (host: bytes usable, default host_budget(); eb: an expert's block bytes, default dense in b)."""
    gpu, need = throughput_memory(cfg, pol, prompt_len, gen_len, b, eb)
    if gpu_memory is not None and gpu > gpu_memory:
        raise MoeflowError(f"the plan N={pol.N}, mu={pol.mu}, r_w={pol.r_w:.2f} needs {gib(gpu)} of GPU memory "
                           f"(non-expert weights, {pol.r_w:.0%} of the experts, two buffers of one layer's "
                           f"experts, the workspace): --gpu-memory {gib(gpu_memory)} is short by "
                           f"{gib(gpu - gpu_memory)}")
    limit = host_budget() if host is None else host
    if need > limit:
        raise MoeflowError(f"the plan N={pol.N} needs {gib(need)} of host memory (the experts and a KV cache of "
                           f"{pol.N} x {prompt_len + gen_len} positions): {gib(limit)} is usable, short by "
                           f"{gib(need - limit)}")
