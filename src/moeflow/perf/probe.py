"""How fast the host runs now, against the minute its profile was measured in.

A shared host's speed drifts: on the H200 host (2026-12-02) Qwen3's lru decode, all on the GPU, spent 8.7 to 25
ms per token launching the same kernels within one call, and fiddler's CPU experts 35 to 62 ms; the figures a
profile measured hold for its minute. SpeedProbe takes two short readings (0.1-0.2 s), beside the
profile's figures (the profile keeps them: `probes`) and again beside each `bench latency` row; Speed is their
ratio, by which the timing model scales the host's share of a layer and the CPU's expert times
(perf/model.py predict_latency), so that its accuracy is judged on the machine as it ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.perf.costs import device_sync, median_s
from moeflow.perf.layers import _steps, _uncap

HOST = "host"              # the host reading's key in a probe's readings (the others: expert shape keys)
PROBE_STEPS = 8            # decode steps per host run; a reading is the median of HOST_RUNS after a warm-up
HOST_RUNS = 7
PROBE_LEN = 1024           # the probe engine's sequence; a new one starts when it is used up
PROBE_POOL = 512 << 20     # host memory the CPU reading rotates through, beyond the caches
CPU_REPEATS = 5


@dataclass(frozen=True)
class Speed:
    """Time now over time at the profile (1: as fast as then; 2: half as fast)."""
    host: float = 1.0   # the host's share of a layer: Python, the dispatcher, launches, the per-layer sync
    cpu: float = 1.0    # the CPU expert kernel

    @classmethod
    def of(cls, now: dict | None, ref: dict | None, shape: str) -> Speed:
        """Readings now against the profile's, each of the readings (1 where either lacks one)."""
        def ratio(k: str) -> float:
            a, b = (now or {}).get(k), (ref or {}).get(k)
            return a / b if a and b else 1.0
        return cls(ratio(HOST), ratio(shape))


def mean_reading(*readings: dict | None) -> dict:
    """Key by key, the mean of the readings that hold it (a span's speed from its readings at each end)."""
    keys = {k for r in readings if r for k in r}
    return {k: sum(v) / len(v) for k in keys if (v := [r[k] for r in readings if r and r.get(k)])}


class SpeedProbe:
    """Readings of the machine's speed (seconds): HOST, a decode step of the tiny synthetic Mixtral (4 layers,
    every expert in a GPU slot: the engine's host path, its GPU work negligible), the median of HOST_RUNS runs
    of PROBE_STEPS; and per expert shape (profile.shape_key), one call of the engine's CPU kernel on K experts of
    one token each (a decode layer's CPU job), rotating through `pool` bytes of host memory, median of
    CPU_REPEATS. The tiny engine and the experts' memory are made on first use and kept until close()."""

    def __init__(self, device, cpu=None, pool: int = PROBE_POOL):
        import torch

        self.dev, self.pool = torch.device(device), pool
        self.sync = device_sync(self.dev)
        self._cpu, self._engine, self._seq, self._jobs = cpu, None, None, {}

    def __call__(self, cfg, dtype_name: str = "bfloat16") -> dict:
        """Both readings, the CPU's for cfg's expert shape."""
        from moeflow.perf.profile import shape_key

        return {HOST: self.host(), shape_key(cfg, dtype_name): self.cpu(cfg, dtype_name)}

    def host(self) -> float:
        eng = self._running()
        return median_s(_steps(eng, PROBE_STEPS), self.sync, HOST_RUNS) / PROBE_STEPS

    def cpu(self, cfg, dtype_name: str = "bfloat16") -> float:
        import torch

        from moeflow.config import parse_dtype
        from moeflow.perf.profile import engine_cpu_experts, shape_key
        from moeflow.synthetic import RandomFiller

        key = shape_key(cfg, dtype_name)
        if key not in self._jobs:
            if self._cpu is None:
                self._cpu = engine_cpu_experts()
            dtype, K = parse_dtype(dtype_name), cfg.num_experts_per_tok
            n = max(self.pool // cfg.expert_bytes(dtype) // K, 1) * K  # whole calls of K experts
            blocks = torch.empty(n, cfg.expert_numel, dtype=dtype, pin_memory=self.dev.type == "cuda")  # [n, 3IH]
            RandomFiller(torch.device("cpu"), dtype, numel=blocks.numel()).fill(blocks)
            self._jobs[key] = (self._cpu.many(K, blocks), torch.randn(1, cfg.hidden_size, dtype=dtype))
        fn, x = self._jobs[key]
        return median_s(lambda: fn(x), lambda: None, CPU_REPEATS)

    def _running(self):
        """The tiny engine with a sequence left to decode (its prefill not timed)."""
        import torch

        from moeflow.config import OffloadConfig
        from moeflow.engine.llm_engine import LLMEngine
        from moeflow.engine.sequence import SamplingParams
        from moeflow.synthetic import build_synthetic

        if self._engine is None:
            cuda = self.dev.type == "cuda"
            ck = build_synthetic("tiny-mixtral", device=self.dev, dtype=torch.bfloat16 if cuda else None,
                                 expert_device="cpu")
            self._engine = LLMEngine(ck, max_seqs=1, max_len=PROBE_LEN, offload=OffloadConfig(1 << 30, "gpu"))
            _uncap(self.dev)  # the engine capped the allocator at its own budget; a bench's engines set theirs
        if self._seq is not None and self._seq.num_tokens + (HOST_RUNS + 1) * PROBE_STEPS >= PROBE_LEN - 16:
            self._engine.abort(self._seq)
            self._seq = None
        if self._seq is None:
            self._seq = self._engine.add_request(
                list(range(3, 11)), SamplingParams(max_new_tokens=PROBE_LEN - 16, ignore_eos=True))
            self._engine.step()
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.model.experts.close()
            self._engine = self._seq = None
        self._jobs.clear()
