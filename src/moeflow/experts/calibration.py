"""On-line correction of the planner's expert costs: observed over predicted CPU and copy times, smoothed.

Their speeds while both draw on host memory, beside the thread that drives the GPU, are what a plan needs,
and they differ from measurements taken alone. The CPU's correction is kept apart for decode-sized and
prompt-sized work (regime()), so decode's does not steer prefill's plan. A decode CPU estimate that keeps the
CPU idle is never observed, so it is tested now and then by a probe (probe_due): a start-up misreading would
otherwise hold for the whole run.
"""

from __future__ import annotations

import torch

from moeflow.perf.costs import ExpertCosts

SCALE_SMOOTHING = 0.2      # weight of the newest layer in the CPU- and copy-speed corrections
SCALE_RANGE = (0.125, 8.0)  # one odd layer (a page fault, a preempted thread) moves them at most this far
BIG_JOB = 16  # tokens: from about here a CPU expert is compute-bound (AMX), below it reads its weights
# Decode layers with misses but nothing on the CPU before a probe: the first gap, and the longest. A probe that
# agrees with the estimate (observed / predicted within PROBE_AGREES) doubles the gap; one that does not resets it.
PROBE_GAP = (32, 4096)
PROBE_AGREES = (2 / 3, 3 / 2)


def regime(tokens: int) -> int:
    """Which CPU correction a layer's CPU work takes: 0 below BIG_JOB tokens for its largest expert, else 1."""
    return int(tokens >= BIG_JOB)


def smoothed(scale: float, observed: float, predicted: float) -> float:
    """The correction `scale` moved towards observed / predicted (clamped to SCALE_RANGE)."""
    ratio = min(max(observed / max(predicted, 1e-9), SCALE_RANGE[0]), SCALE_RANGE[1])
    return scale + SCALE_SMOOTHING * (ratio - scale)


class CostCorrection:
    """The CPU corrections by regime() and the copy correction; `enabled` False keeps given costs as given.
    Copies are timed by events on the copy stream, read at the next layer (by then done: no wait)."""

    def __init__(self, inter: int):
        self.inter = inter
        self.cpu_scales, self.copy_scale, self.enabled = [1.0, 1.0], 1.0, True
        self._copy_timing: tuple | None = None  # (start, end events, predicted s) of the last layer's copies
        self._pending: tuple | None = None      # the same for the layer being launched
        self._started = False                   # its start recorded (at its first transfer)
        self._scaled: dict[tuple, tuple] = {}  # (id of the costs, corrections) -> (the costs, scaled)
        self._pairs: list[tuple] = []  # two (start, end) timing events, in turn: one per layer is in use
        self._idle, self._gap = 0, PROBE_GAP[0]  # decode layers planned without the CPU since it was observed

    def scaled(self, costs: ExpertCosts | None, misses: dict[int, int]) -> ExpertCosts | None:
        """costs corrected for a layer whose missing experts take these tokens; None where nothing is
        planned (no costs, or no miss)."""
        if costs is None or not misses:
            return None
        # the corrections to 1%: a layer reuses the costs scaled for an earlier one (a new ExpertCosts per layer
        # cost more host time than the rest of the plan)
        key = (id(costs), round(self.cpu_scales[regime(max(misses.values()))], 2), round(self.copy_scale, 2))
        hit = self._scaled.get(key)
        if hit is None or hit[0] is not costs:
            if len(self._scaled) > 256:
                self._scaled.clear()
            hit = self._scaled[key] = (costs, costs.scaled(key[1], key[2]))
        return hit[1]

    def observe_cpu(self, costs: ExpertCosts | None, jobs, busy_s: float, beside_copies: bool,
                    probe: bool = False) -> None:
        """A layer's CPU share took busy_s; jobs: (expert, rows, entries); costs: the uncorrected ones; probe: the
        share was a probe's (probe_due)."""
        if costs is None or not self.enabled:
            return
        predicted = costs.cpu_work([(len(ent), r / self.inter) for _, r, ent in jobs], beside_copies)
        k = regime(max(len(ent) for _, _, ent in jobs))
        if k == 0:
            ratio = busy_s / max(predicted * self.cpu_scales[0], 1e-9)
            agrees = probe and PROBE_AGREES[0] <= ratio <= PROBE_AGREES[1]
            self._idle, self._gap = 0, min(2 * self._gap, PROBE_GAP[1]) if agrees else PROBE_GAP[0]
        self.cpu_scales[k] = smoothed(self.cpu_scales[k], busy_s, predicted)

    def probe_due(self, tokens: int) -> bool:
        """A decode layer (its largest miss has `tokens` tokens) is planned with misses and nothing on the CPU:
        True where the CPU estimate has gone untested for the current gap (the caller then puts part of a miss on
        the CPU, and passes probe=True to observe_cpu)."""
        if not self.enabled or regime(tokens) != 0:
            return False
        self._idle += 1
        if self._idle < self._gap:
            return False
        self._idle = 0
        return True

    def start_copies(self, stream: torch.cuda.Stream | None, copies: dict[int, int],
                     costs: ExpertCosts | None) -> None:
        """Before a layer's copies (expert -> rows left on the CPU) on `stream`; costs: the corrected ones."""
        if stream is None or not (copies and costs is not None and self.enabled):
            return
        predicted = sum(costs.copy((self.inter - r) / self.inter) for r in copies.values()) / self.copy_scale
        if len(self._pairs) < 2:
            self._pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        self._pairs.reverse()
        start, end = self._pairs[0]  # the other pair may still be the last layer's, not read yet
        self._pending = (start, end, predicted)
        self._started = False

    def transfers_begin(self, stream: torch.cuda.Stream | None) -> None:
        """The layer's first transfer comes next on `stream`: the timing starts here, after the stream's waits for
        the waves that last read the slots (compute time, not the copies')."""
        if self._pending is not None and not self._started:
            self._pending[0].record(stream)
            self._started = True

    def end_copies(self, stream: torch.cuda.Stream | None) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self._started:
            pending[1].record(stream)
            self._copy_timing = pending

    def observe_copies(self) -> None:
        """The last layer's copy time, read once this layer's CPU work is under way."""
        if self._copy_timing is None:
            return
        start, end, predicted = self._copy_timing
        self._copy_timing = None
        if end.query():
            self.copy_scale = smoothed(self.copy_scale, start.elapsed_time(end) / 1e3, predicted)
