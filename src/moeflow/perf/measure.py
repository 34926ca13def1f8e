"""Measuring this machine into a HardwareProfile (`moeflow profile`): CPU memory and matmul rates, cfg's expert
on the CPU (the engine's kernel), on the GPU and over the link, the links and the GPU's rates, the host's share
of a layer and a step (perf/layers.py), the resident decode layer, the speed probe beside them (perf/probe.py).

get_profile: this machine's profile for a shape, from the cache (perf/profile.py) or measured and cached.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from moeflow.config import ModelConfig
from moeflow.perf.costs import (TOKEN_POINTS, ExpertCosts, device_sync, handoff_s, measure_costs, median_costs,
                                median_s, monotone, one_and_fixed)
from moeflow.perf.layers import host_overheads, layer_key, time_resident_layer
from moeflow.perf.probe import SpeedProbe
from moeflow.perf.profile import (HardwareProfile, _host_memory, _plain, cached_profile, cpu_model,
                                  local_device_name, profile_path, shape_key)

PREFILL_TOKENS = (32, 512, 2048)  # the prompts whose per-layer host time the profile measures (prefill_overhead_s):
                                  # 2048 x 2 routing entries, as many as a 512-token prompt of Qwen3's 8 per token
MANY = 4  # experts (at most) in the one-call CPU measurement that separates a call's fixed part


@dataclass(frozen=True)
class Sizes:
    """How much each measurement moves: `full` for a real profile, `quick` for tests and smoke runs."""

    mem_bytes: int = 1 << 30
    link_bytes: int = 256 << 20
    matmul_n: int = 8192
    cpu_matmul_n: int = 2048
    expert_pool_bytes: int = 1 << 30  # host expert blocks rotated through, so the CPU reads from memory
    repeats: int = 5
    rounds: int = 3  # expert-cost measurements, combined point by point by their median
    # the host's share of a layer (perf/layers.py host_overheads): decode steps per run, runs per model (their
    # median), the deep model's layers (without a GPU at most CPU_HOST_LAYERS), the prefill figures' prompts
    host_steps: int = 32
    host_repeats: int = 7
    host_layers: int = 36
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS
    probe_runs: int = 7  # SpeedProbe's runs per reading

    @property
    def quick(self) -> bool:
        return self.repeats < 3


QUICK = Sizes(mem_bytes=8 << 20, link_bytes=4 << 20, matmul_n=256, cpu_matmul_n=128, expert_pool_bytes=4 << 20,
              repeats=1, rounds=1, host_steps=4, host_repeats=1, host_layers=8, prefill_tokens=(8, 32), probe_runs=3)
CPU_HOST_LAYERS = 12  # without a GPU the tiny model's layers are CPU compute, which no plan reads: the short span


def engine_cpu_experts(fmt=None):
    """The engine's CPU expert backend (experts/cpu.py CpuExperts) with the threads the offloaded engine gives
    it (one core left to the thread that drives the GPU); fmt: the blocks' (biased experts: experts/biased.py)."""
    import torch

    from moeflow.experts.cpu import CpuExperts, cpu_threads

    return CpuExperts(threads=cpu_threads(driver=torch.cuda.is_available()), fmt=fmt)


def cpu_expert_ffn() -> Callable:
    """The engine's CPU expert path on one host block, ffn(x [n, H], block [3IH]) -> [n, H]."""
    return engine_cpu_experts().expert


class _Steps:
    """The progress bar over the profile's steps."""

    def __init__(self, names: list[str], progress: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc="profiling", unit="step", disable=not progress)

    def start(self, name: str) -> None:
        self.bar.set_postfix_str(name)

    def done(self) -> None:
        self.bar.update()


def measure_profile(cfg: ModelConfig, device: str = "cuda", dtype_name: str = "bfloat16", sizes: Sizes = Sizes(),
                    progress: bool = True, base: HardwareProfile | None = None,
                    cpu_ffn: Callable | None = None) -> HardwareProfile:
    """Measure this machine for cfg's expert shape. With `base` (a cached profile of this machine), only the
    expert shape is measured and added to it. cpu_ffn(x, block) times another CPU expert kernel than the
    engine's (default: cpu_expert_ffn)."""
    import torch

    from moeflow.experts.cpu import thread_split

    cuda = device != "cpu" and torch.cuda.is_available()
    dev = torch.device(device if cuda else "cpu")
    steps = _Steps((["CPU expert"] if base else
                    ["CPU memory", "CPU matmul", "CPU expert"] + (["links", "GPU memory", "GPU matmul"] if cuda else [])
                    + ["layer overhead"]) + (["resident layer"] if cuda else []), progress)
    t_start = time.perf_counter()
    probe = SpeedProbe(dev, sizes.probe_runs) if not base else None  # the host's speed (perf/probe.py)
    threads = torch.get_num_threads()
    if cuda:  # measured as the engine runs: one core left to the thread that drives the GPU
        torch.set_num_threads(thread_split(driver=True).torch)
    try:
        figures = {} if base else _cpu_rates(dtype_name, sizes, steps)
        expert = {shape_key(cfg, dtype_name): _expert_costs(cfg, dev, dtype_name, sizes, cpu_ffn, steps)}
        if base:
            return replace(base, experts=base.experts | expert,
                           resident_layers=base.resident_layers | _resident_layer(cfg, dev, dtype_name, sizes, steps),
                           source=f"{base.source}; {shape_key(cfg, dtype_name)} added in "
                                  f"{time.perf_counter() - t_start:.0f} s")
        if cuda:
            figures |= _gpu_rates(dev, sizes, steps)
        figures |= _host_figures(cfg, dev, dtype_name, sizes, probe, steps)
    finally:
        if probe is not None:
            probe.close()
        torch.set_num_threads(threads)
        steps.bar.close()
    return HardwareProfile(
        host=socket.gethostname(), cpu_model=cpu_model(), cpu_threads=os.cpu_count() or 1,
        host_memory=_host_memory(), experts=expert,
        source=f"measured {time.strftime('%Y-%m-%d %H:%M')} in {time.perf_counter() - t_start:.0f} s" +
        ("" if sizes == Sizes() else " (quick sizes)"),
        **figures)


def _cpu_rates(dtype_name: str, sizes: Sizes, steps: _Steps) -> dict:
    import torch

    from moeflow.bench.ceilings import memory_bandwidth
    from moeflow.config import parse_dtype

    steps.start("CPU memory")
    out = {"cpu_read_bw": memory_bandwidth(torch.device("cpu"), sizes.mem_bytes)}
    steps.done()
    steps.start("CPU matmul")
    out["cpu_flops"] = cpu_matmul_rate(parse_dtype(dtype_name), sizes.cpu_matmul_n, sizes.repeats)
    steps.done()
    return out


def _expert_costs(cfg: ModelConfig, dev, dtype_name: str, sizes: Sizes, cpu_ffn: Callable | None,
                  steps: _Steps) -> dict:
    """cfg's expert timed in rounds, each point's median taken (one slow spell of a shared host is outvoted):
    on the CPU (the engine's kernel unless cpu_ffn), copied and on the GPU; the hand-over of a CPU call."""
    import torch

    from moeflow.config import parse_dtype
    from moeflow.synthetic import RandomFiller

    steps.start("CPU expert")
    dtype = parse_dtype(dtype_name)
    n_blocks = max(2, min(256, -(-sizes.expert_pool_bytes // cfg.expert_bytes(dtype))))
    blocks = torch.empty(n_blocks, cfg.expert_numel, dtype=dtype, pin_memory=dev.type == "cuda")  # [B, 3IH]
    RandomFiller(torch.device("cpu"), dtype, numel=blocks.numel()).fill(blocks)
    from moeflow.experts.biased import BiasedFormat

    fmt = BiasedFormat.of(cfg, dtype) if cfg.expert_bias else None  # blocks of cfg.expert_numel
    engine_cpu = None if cpu_ffn else engine_cpu_experts(fmt)
    ffn = cpu_ffn or engine_cpu.expert
    # the fixed part of a call: m experts in one call against one alone (the engine's kernel only); a big
    # expert's pool holds few blocks (Mixtral: 3 of 352 MB), but m of them outgrow the caches anyway
    m = min(MANY, n_blocks - 1)
    many = (m, engine_cpu.many(m, blocks)) if engine_cpu and m >= 2 else None
    once = _gpu_costs(cfg, dev, blocks, ffn, many, sizes.repeats, fmt) if dev.type == "cuda" else \
        _cpu_costs(cfg, blocks, ffn, many, sizes.repeats)
    costs = median_costs([once() for _ in range(max(sizes.rounds, 1))])
    if engine_cpu is not None:  # the engine's own hand-over (its kernel's thread, or its worker thread)
        call = engine_cpu.handoff_s()
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            call = handoff_s(pool)
    steps.done()
    return _plain(replace(costs, cpu_call_s=call))


def _gpu_costs(cfg: ModelConfig, dev, blocks, ffn: Callable, many, repeats: int,
               fmt=None) -> Callable[[], ExpertCosts]:
    """One round: CPU, copy and GPU times of the expert, each beside the other (perf/costs.py measure_costs)."""
    import torch

    from moeflow.experts.ffn import block_ffn

    H, I = cfg.hidden_size, cfg.expert_intermediate_size
    slot = torch.empty(cfg.expert_numel, dtype=blocks.dtype, device=dev)
    stream = torch.cuda.Stream(dev)
    return lambda: measure_costs(lambda i: blocks[i], I, H, len(blocks), slot, ffn, block_ffn(I, fmt), repeats,
                                 copy_stream=stream, cpu_many=many)


def _cpu_costs(cfg: ModelConfig, blocks, ffn: Callable, many, repeats: int) -> Callable[[], ExpertCosts]:
    """One round without a GPU: the CPU's times by token count, the blocks taken in turn."""
    import torch

    H, n_blocks, turn = cfg.hidden_size, len(blocks), iter(range(1 << 30))

    def once() -> ExpertCosts:
        cpu_s = []
        for n in TOKEN_POINTS:
            x = torch.randn(n, H, dtype=blocks.dtype)
            cpu_s.append(median_s(lambda: ffn(x, blocks[next(turn) % n_blocks]), lambda: None, repeats))
        x1, fixed = torch.randn(1, H, dtype=blocks.dtype), 0.0
        if many:  # as measure_costs: one alone and m in one call, in turns
            cpu_s[0], fixed = one_and_fixed(lambda: ffn(x1, blocks[next(turn) % n_blocks]),
                                            (many[0], lambda: many[1](x1)), repeats)
        cpu_s = monotone(cpu_s)  # as measure_costs: noise only adds time; the fixed part within one call
        return ExpertCosts(TOKEN_POINTS, tuple(cpu_s), tuple(cpu_s), 0.0, cpu_fixed_s=min(fixed, cpu_s[0]))

    return once


def _gpu_rates(dev, sizes: Sizes, steps: _Steps) -> dict:
    """The links (pinned, both ways, bandwidth and latency; CPU reads beside copies), GPU memory and matmul."""
    import torch

    from moeflow.bench.ceilings import concurrent_host_read, memory_bandwidth

    steps.start("links")
    out = _links(dev, sizes)
    both = concurrent_host_read(dev, sizes.mem_bytes)
    out["host_read_bw_shared"] = both["cpu_read_bw_concurrent"] + both["h2d_bw_concurrent"]
    out["h2d_bw_shared"] = both["h2d_bw_concurrent"]
    steps.done()
    steps.start("GPU memory")
    out["gpu_bw"] = memory_bandwidth(dev, sizes.mem_bytes)
    steps.done()
    steps.start("GPU matmul")
    out["gpu_flops"] = _gpu_matmul_rate(dev, sizes)
    out |= {"gpu_name": torch.cuda.get_device_name(dev),
            "gpu_memory": torch.cuda.get_device_properties(dev).total_memory}
    steps.done()
    return out


def _links(dev, sizes: Sizes) -> dict:
    import torch

    sync, nb = device_sync(dev), sizes.link_bytes
    host = torch.empty(nb, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nb, dtype=torch.uint8, device=dev)
    return {"h2d_bw": nb / median_s(lambda: gpu.copy_(host, non_blocking=True), sync, sizes.repeats + 2),
            "d2h_bw": nb / median_s(lambda: host.copy_(gpu, non_blocking=True), sync, sizes.repeats + 2),
            "h2d_latency_s": median_s(lambda: gpu[:4096].copy_(host[:4096], non_blocking=True), sync, 20),
            "d2h_latency_s": median_s(lambda: host[:4096].copy_(gpu[:4096], non_blocking=True), sync, 20)}


def _gpu_matmul_rate(dev, sizes: Sizes) -> float:
    import torch

    n = sizes.matmul_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    return 2 * n**3 / median_s(lambda: a @ b, device_sync(dev), sizes.repeats + 2)


def _host_figures(cfg: ModelConfig, dev, dtype_name: str, sizes: Sizes, probe: SpeedProbe, steps: _Steps) -> dict:
    """The host's share of a layer and a step, the resident layer, and the speed probe's median beside them."""
    import torch

    steps.start("layer overhead")
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()  # the engine caps the allocator at its budget while it runs
    tokens = sizes.prefill_tokens
    host_reads = [probe()]  # before, after, and after the resident layer's: their median
    layers = sizes.host_layers if cuda else min(sizes.host_layers, CPU_HOST_LAYERS)
    layer, expert, step, prefill = host_overheads(dev, sizes.host_steps, tokens, sizes.host_repeats, layers)
    host_reads.append(probe())
    steps.done()
    out = {"prefill_tokens": tokens, "layer_overhead_s": layer, "expert_overhead_s": expert,
           "step_overhead_s": step, "prefill_overhead_s": prefill,
           "resident_layers": _resident_layer(cfg, dev, dtype_name, sizes, steps)}
    return out | {"probe_s": statistics.median(host_reads + [probe()])}


def _resident_layer(cfg: ModelConfig, dev, dtype_name: str, sizes: Sizes, steps: _Steps) -> dict:
    """cfg's decode layer with its experts on the GPU (none without a GPU: its time is the CPU's)."""
    import torch

    from moeflow.config import parse_dtype

    if dev.type != "cuda":
        return {}
    steps.start("resident layer")
    torch.cuda.empty_cache()
    t = time_resident_layer(cfg, dev, parse_dtype(dtype_name), 16 if sizes.quick else 32, 3 if sizes.quick else 7)
    steps.done()
    return {layer_key(cfg, dtype_name): t}


def cpu_matmul_rate(dtype, n_max: int, repeats: int, enough_s: float = 0.05) -> float:
    """FLOP/s of an n x n matmul on the CPU, n doubled from 128 up to n_max while one takes under enough_s: a
    CPU without bf16 instructions took 57 s for one of 2048 (0.3 GFLOP/s)."""
    import torch

    n = 128
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        a @ b
        if n >= n_max or time.perf_counter() - t >= enough_s:
            return 2 * n**3 / median_s(lambda: a @ b, lambda: None, repeats)
        n *= 2


def checkpoint_profile(ck) -> HardwareProfile:
    """This GPU host's profile for a loaded checkpoint's expert shape and dtype (get_profile: cached after once)."""
    return get_profile(ck.cfg, "cuda", dtype_name=str(ck.store.dtype).removeprefix("torch."))[0]


def get_profile(cfg: ModelConfig, device: str = "cuda", refresh: bool = False, dtype_name: str = "bfloat16",
                sizes: Sizes = Sizes(), progress: bool = True) -> tuple[HardwareProfile, str]:
    """This machine's profile for cfg's shape: from the cache, measuring (and caching) what is missing.
    Returns (profile, what happened: "cached" | "measured" | "added shape")."""
    name = local_device_name(device)
    cached = None if refresh else cached_profile(name)
    if cached is not None and cached.has_layer(cfg, dtype_name):
        return cached, "cached"
    profile = measure_profile(cfg, device, dtype_name, sizes, progress, base=cached)
    profile.save(profile_path(name))
    return profile, "added shape" if cached is not None else "measured"
