"""HardwareProfile: the running machine measured once (`moeflow profile`, perf/measure.py) and cached per host
and device; the built-in reference profile; the costs the engine takes from the cache.

Every figure the planner and the engine's cost model need: CPU memory read bandwidth and matmul rate, the
CPU expert FFN by token count (with the CPU expert kernel the engine runs), host<->GPU bandwidth and latency
from pinned memory, GPU memory bandwidth, GPU expert FFN by token count, GPU bf16 matmul rate, and the
host-side cost of one offloaded layer. Expert timings are kept per expert shape ("HxI:dtype").

The cache: `$MOEFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/moeflow`, else `~/.cache/moeflow`; one file per
host and device, `profile-<host>-<device>.json`, which also records the CPU model and the CPU expert
backend: a file measured on another CPU or with another kernel is measured again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from moeflow import MoeflowError
from moeflow.config import ModelConfig, cache_dir, write_whole
from moeflow.perf.costs import TOKEN_POINTS, ExpertCosts
from moeflow.perf.layers import PREFILL_K, layer_key

PROFILE_VERSION = 4  # 2: copies and CPU timed beside each other throughout; expert_overhead_s; 3: resident_layers;
                     # 4: probe_s, the resident layer with all experts that fit
READABLE_VERSIONS = (1, 2, 3, 4)  # older ones lack later figures (0: not measured), and a cached one is re-measured
CPU_BACKEND = "cpu-experts"  # the CPU expert backend the engine runs: experts/cpu.py CpuExperts (cpu_expert_ffn)
CPU_CALL_FLOOR_S, GPU_CALL_FLOOR_S = 20e-6, 15e-6  # fixed cost of one expert call (scaling between shapes)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _plain(costs: ExpertCosts) -> dict:
    """ExpertCosts as JSON holds it (lists, not tuples), so a profile equals its reloaded self."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in costs.as_dict().items()}


def shape_key(cfg: ModelConfig, dtype_name: str = "bfloat16") -> str:
    """The key of an expert's costs: its shape and dtype; biased experts (GPT-OSS) run another kernel path."""
    return f"{cfg.hidden_size}x{cfg.expert_intermediate_size}:{dtype_name}" + (":biased" if cfg.expert_bias else "")


@dataclass(frozen=True)
class HardwareProfile:
    """Rates in bytes/s and FLOP/s, times in seconds, sizes in bytes. GPU fields are 0 without a GPU."""

    host: str
    cpu_model: str
    cpu_threads: int
    host_memory: int
    cpu_read_bw: float           # CPU memory read, all threads
    cpu_flops: float             # CPU matmul rate (bf16)
    gpu_name: str | None = None
    gpu_memory: int = 0
    gpu_bw: float = 0.0          # GPU memory traffic (read + write) of a large copy
    gpu_flops: float = 0.0       # GPU bf16 matmul rate
    h2d_bw: float = 0.0          # pinned host -> GPU
    h2d_latency_s: float = 0.0   # one small transfer
    d2h_bw: float = 0.0
    d2h_latency_s: float = 0.0
    host_read_bw_shared: float = 0.0  # CPU reads + host -> GPU copies while both run (they share host memory);
                                      # 0: not measured (the bound then takes the sum of the two rates)
    h2d_bw_shared: float = 0.0   # the copies' part of it; 0: not measured (taken as h2d_bw)
    layer_overhead_s: float = 0.0  # host-side cost of one offloaded layer (sync, planning, launches)
    expert_overhead_s: float = 0.0  # what each routed expert beyond PREFILL_K adds to a decode layer's
    step_overhead_s: float = 0.0   # a decode step's own host time beyond its layers' (sampling, bookkeeping)
    prefill_overhead_s: tuple = ()  # the same in prefills of prefill_tokens tokens (eager launches, the
                                    # routing's bookkeeping); empty: not measured
    prefill_tokens: tuple = (32, 512)  # their prompts (older profiles measured these two)
    cpu_backend: str = CPU_BACKEND
    experts: dict = field(default_factory=dict)  # shape_key -> ExpertCosts.as_dict() (gpu_s = cpu_s without GPU)
    resident_layers: dict = field(default_factory=dict)  # layer_key -> seconds of a decode layer of that shape
                                                         # with its experts on the GPU (layers.time_resident_layer)
    probe_s: float = 0.0         # SpeedProbe's reading (perf/probe.py) beside the host figures; 0: not taken
    source: str = ""             # "measured <date>" or where the figures come from
    version: int = PROFILE_VERSION

    def decode_layer_s(self, top_k: int) -> float:
        """The host's time in an offloaded decode layer of a model routing each token to top_k experts."""
        return max(self.layer_overhead_s + (top_k - PREFILL_K) * self.expert_overhead_s, 0.0)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu_name)

    @property
    def device_name(self) -> str:
        return self.gpu_name or "cpu"

    # -- JSON ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        if d.get("version") not in READABLE_VERSIONS:
            raise MoeflowError(f"hardware profile version {d.get('version')!r}; this moeflow reads versions "
                               f"{READABLE_VERSIONS} (run `moeflow profile --refresh`)")
        known = {f.name for f in fields(cls)}
        if "probe_s" not in d and isinstance(d.get("probes"), dict):  # older profiles: the readings in a dict
            d = d | {"probe_s": d["probes"].get("host", 0.0)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        try:
            d = json.loads(Path(path).read_text())
            return cls.from_dict(d)
        except FileNotFoundError:
            raise MoeflowError(f"hardware profile {path} does not exist") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise MoeflowError(f"{path} is not a moeflow hardware profile ({e})") from None

    # -- expert costs --------------------------------------------------------------------------------
    def has_shape(self, cfg: ModelConfig, dtype_name: str = "bfloat16") -> bool:
        return shape_key(cfg, dtype_name) in self.experts

    def has_layer(self, cfg: ModelConfig, dtype_name: str = "bfloat16") -> bool:
        """Whether it holds what cfg's plans read: the expert shape, and with a GPU the resident decode layer."""
        return self.has_shape(cfg, dtype_name) and (not self.has_gpu or self.resident_layer(cfg, dtype_name) > 0)

    def resident_layer(self, cfg: ModelConfig, dtype_name: str = "bfloat16") -> float:
        """Seconds of a decode layer of cfg's shapes with its experts on the GPU; 0: not measured."""
        return self.resident_layers.get(layer_key(cfg, dtype_name), 0.0)

    def expert_costs(self, cfg: ModelConfig, dtype_name: str = "bfloat16") -> ExpertCosts:
        """ExpertCosts for cfg's expert shape: as measured, or scaled from the nearest measured shape (work and
        bytes of an expert both grow with H x I at a given token count), or from the rates alone."""
        key = shape_key(cfg, dtype_name)
        nbytes = cfg.expert_numel * DTYPE_BYTES.get(dtype_name, 2)
        copy_s = self.h2d_latency_s + nbytes / self.h2d_bw if self.has_gpu else 0.0
        if key in self.experts:  # completed from the rates as the timing model completes them (one source)
            return ExpertCosts.from_dict(self.experts[key]).with_rates(
                nbytes, self.gpu_bw, self.cpu_read_bw, self.h2d_bw if self.has_gpu else 0.0)
        size = cfg.hidden_size * cfg.expert_intermediate_size
        if self.experts:
            def ratio(k):
                h, i = k.split(":")[0].split("x")
                return int(h) * int(i) / size
            near = min(self.experts, key=lambda k: abs(math.log(ratio(k))))
            ref, r = ExpertCosts.from_dict(self.experts[near]), 1 / ratio(near)
            floor = ref.cpu_fixed_s or CPU_CALL_FLOOR_S  # a call's fixed part does not grow with the shape
            cpu = tuple(floor + max(t - floor, 0.0) * r for t in ref.cpu_s)
            gpu = tuple(GPU_CALL_FLOOR_S + max(t - GPU_CALL_FLOOR_S, 0.0) * r for t in ref.gpu_s)
            return replace(ref, cpu_s=cpu, gpu_s=gpu if self.has_gpu else cpu, copy_s=copy_s,
                           copy_latency_s=self.h2d_latency_s)
        # Nothing measured for any shape: the roofline (the CPU reads at half its ceiling in bf16, as measured).
        flops = [6 * n * size for n in TOKEN_POINTS]
        cpu = tuple(CPU_CALL_FLOOR_S + max(nbytes / (0.5 * self.cpu_read_bw), f / self.cpu_flops) for f in flops)
        gpu = tuple(GPU_CALL_FLOOR_S + max(nbytes / self.gpu_bw, f / self.gpu_flops) for f in flops) \
            if self.has_gpu else cpu
        return ExpertCosts(TOKEN_POINTS, cpu, gpu, copy_s, self.h2d_latency_s)


# -- the built-in reference: an H100 host measured 2026-11-22 ----------------------------------------------
def reference_profile() -> HardwareProfile:
    """An H100 host (PCIe Gen5) measured 2026-11-22. Expert times are the engine's own side-by-side
    measurement at 1 token (CPU 7.4 ms, copy 6.6 ms, GPU 0.19 ms) with PyTorch's measured curve (1/16/64/256 tokens:
    7.0/5.7/7.9/27 ms) scaled to it; 4096 tokens on the CPU is extrapolated. GPU memory bandwidth was not
    measured: 3.0 TB/s is assumed (HBM3 nominal 3.35). The layer overhead is the lead's ~37 ms per token of
    non-expert time over 32 layers, less the ~1 ms the GPU needs to read the 3.2 GB of dense weights."""
    s = 7.4 / 7.0
    mixtral = ExpertCosts(
        tokens=(1, 16, 64, 256, 4096),
        cpu_s=tuple(t * 1e-3 * s for t in (7.0, 5.7, 7.9, 27.0, 27.0 * 16)),
        gpu_s=(0.19e-3, 0.19e-3, 0.20e-3, 0.21e-3, 2.2e-3),
        copy_s=6.6e-3, copy_latency_s=16e-6, cpu_call_s=30e-6)
    return HardwareProfile(
        host="reference-h100", cpu_model="Intel Xeon, 16 cores, AVX512-BF16 + AMX-BF16",
        cpu_threads=16, host_memory=128 << 30, cpu_read_bw=99e9,
        cpu_flops=6 * 256 * 4096 * 14336 / 27e-3,  # the bf16 expert at 256 tokens: 3.3 TFLOP/s
        gpu_name="NVIDIA H100 80GB HBM3", gpu_memory=80 << 30, gpu_bw=3.0e12, gpu_flops=800e12,
        h2d_bw=54e9, h2d_latency_s=16e-6, d2h_bw=50e9, d2h_latency_s=16e-6,
        layer_overhead_s=(37e-3 - 3.2e9 / 3.0e12) / 32,
        experts={"4096x14336:bfloat16": _plain(mixtral)},
        source="built-in reference: an H100 host (measured 2026-11-22), not this machine")


# -- the cache -------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", s).strip("-") or "unknown"


def profile_path(device_name: str, host: str | None = None) -> Path:
    return cache_dir() / f"profile-{_slug(host or socket.gethostname())}-{_slug(device_name)}.json"


def local_device_name(device: str = "cuda") -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def cached_profile(device_name: str | None = None) -> HardwareProfile | None:
    """This machine's cached profile for the device, or None (missing, stale version, other CPU or kernel)."""
    device_name = device_name or local_device_name()
    path = profile_path(device_name)
    if not path.exists():
        return None
    try:
        p = HardwareProfile.load(path)
    except MoeflowError:
        return None
    if p.version != PROFILE_VERSION or p.cpu_model != cpu_model() or p.cpu_backend != CPU_BACKEND or \
            p.device_name != device_name:
        return None
    return p


def profiled_costs(cfg: ModelConfig, dtype, device) -> ExpertCosts | None:
    """The engine's costs from this machine's cached profile, if it measured cfg's expert shape on this GPU."""
    import torch

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    dtype_name = str(dtype).removeprefix("torch.")
    p = cached_profile(name)
    return p.expert_costs(cfg, dtype_name) if p is not None and p.has_shape(cfg, dtype_name) else None


def engine_costs(ck, oc) -> ExpertCosts | None:
    """What the caller hands LLMEngine as expert_costs for a Checkpoint under OffloadConfig `oc`: the cached
    profile's, where its policy plans by costs and the profile holds the model's expert shape on this GPU;
    else None (the backend measures them at start where it needs them)."""
    from moeflow.policy import get_policy

    device = next(ck.model.parameters()).device
    # a quantized store's experts cost what the profile's dense ones do not: the backend measures them (biased
    # ones have their own key, timed on the engine's path for them: perf/measure.py)
    if oc is None or device.type != "cuda" or not get_policy(oc.policy).needs_costs or ck.store.fmt.quantized:
        return None
    return profiled_costs(ck.cfg, ck.store.dtype, device)


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
