"""How fast the host runs now, against the minute its profile was measured in.

A shared host's speed drifts: the same kernels' launch time per token can move 3x within one call
(docs/history/2026-12-02.md), so the host figures a profile measured hold for its minute. SpeedProbe reads the
host's speed in about 0.1 s: once beside the profile's host figures (the profile keeps the reading: probe_s)
and again beside each `bench latency` row. Their ratio, host_speed, scales the host's share of a layer and of a
step in the timing model (perf/model.py predict_latency).

The same reading of the CPU expert kernel (one call of K experts) was tried and dropped: it moved 0.8-1.9x
across runs while fiddler's CPU-bound decode stayed within 2%, and taking it put fiddler's predictions 10%
lower than without it.
"""

from __future__ import annotations

from moeflow.perf.costs import device_sync, median_s
from moeflow.perf.layers import _steps, _uncap, tiny_engine

PROBE_STEPS = 8            # decode steps per run; a reading is the median of HOST_RUNS runs after a warm-up
HOST_RUNS = 7
PROBE_LEN = 1024           # the probe engine's sequence; a new one starts when too little of it is left


def host_speed(now: float | None, then: float | None) -> float:
    """Time now over time at the profile (1: as fast as then, 2: half as fast; 1 where either is missing)."""
    return now / then if now and then else 1.0


class SpeedProbe:
    """The host's speed as seconds of a decode step of the tiny synthetic Mixtral (4 layers, every expert in a
    GPU slot: the engine's host path, sync, planning and launches, with negligible GPU work): the median of
    `runs` runs (HOST_RUNS) of PROBE_STEPS steps. Its engine is made on first use and kept until close()."""

    def __init__(self, device, runs: int = HOST_RUNS):
        import torch

        self.dev, self.runs = torch.device(device), runs
        self.sync = device_sync(self.dev)
        self._engine, self._seq = None, None

    def __call__(self) -> float:
        return median_s(_steps(self._running(), PROBE_STEPS), self.sync, self.runs) / PROBE_STEPS

    def _running(self):
        """The tiny engine with a sequence left to decode (its prefill not timed)."""
        from moeflow.engine.sequence import SamplingParams

        if self._engine is None:
            self._engine = tiny_engine(self.dev, 4, PROBE_LEN)
            _uncap(self.dev)  # the engine capped the allocator at its own budget; a bench's engines set theirs
        if self._seq is not None and self._seq.num_tokens + (self.runs + 1) * PROBE_STEPS >= PROBE_LEN - 16:
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
