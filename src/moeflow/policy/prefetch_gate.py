"""PrefetchGate: how many predicted experts to copy ahead (fmoe's map picks, auto-prefetch's guesses), from what
the predictions and the copies measure, not from constants fitted to a trace.

- Confidence: every pick made for a layer (layer, expert, use: the predicted chance it is selected) is scored
  when its layer comes, copied or not, so a cold or mismatched store is measured without copying anything.
  The calibration c = hits / expected uses over the last WINDOW scored picks (0 until EVIDENCE expected uses
  are scored, at most 1) scales each pick's use; a pick is copied only where c x use reaches the threshold
  (fmoe: more likely used than not). A store that predicts garbage (c ~ its precision) copies nothing.
- Copy engine: a batch is issued only once the last one has landed (the next layer's demand copies queue
  behind it on the stream); the batch size grows by one per layer that finds the engine idle and halves when
  it does not (additive increase, multiplicative decrease), at most what the engine moves in a layer's time.
"""

from __future__ import annotations

import numpy as np

WINDOW = 256    # scored picks the calibration remembers (a few tokens' worth)
EVIDENCE = 16   # expected uses scored before the calibration counts (a new store proves itself first)

Pick = tuple[int, int, float]  # (MoE layer row, expert, predicted use)


def break_even(miss_s: float, copy_s: float) -> float:
    """The calibrated use above which a copy ahead pays: p x (the miss it saves) > (1 - p) x (the copy it wastes)."""
    return copy_s / (miss_s + copy_s) if miss_s + copy_s > 0 else 1.0


class PrefetchGate:
    def __init__(self, window: int = WINDOW, evidence: float = EVIDENCE):
        self.keep, self.evidence = 1.0 - 1.0 / window, evidence
        self.hits = self.expected = 0.0  # decayed sums over the scored picks
        self.total = 0.0  # expected uses scored in all (undecayed)
        self.batch = 1.0  # the copy engine's window (copies per layer)

    @property
    def calibration(self) -> float:
        if self.total < self.evidence:
            return 0.0
        return min(1.0, self.hits / self.expected)

    def score(self, layer: int, selected: np.ndarray, picks: list[Pick]) -> None:
        """Layer `layer` selected `selected` [K]: the picks made for it are scored."""
        sel = set(selected.tolist())
        mine = [(e in sel, u) for lay, e, u in picks if lay == layer]
        for hit, u in mine:
            self.hits = self.hits * self.keep + hit
            self.expected = self.expected * self.keep + u
            self.total += u

    def admit(self, picks: list[Pick], threshold: float) -> list[tuple[int, int]]:
        """The picks worth copying, in their order: calibrated use >= threshold."""
        c = self.calibration
        return [(lay, e) for lay, e, u in picks if u * c >= threshold] if c > 0 else []

    def budget(self, idle: int, in_flight: bool) -> int:
        """Copies allowed now: idle, what the copy engine moves in the rest of a layer; in_flight: the last batch
        has not landed."""
        if in_flight:
            self.batch = max(1.0, self.batch / 2)
            return 0
        n = min(idle, int(self.batch))
        self.batch = min(self.batch + 1.0, max(float(idle), 1.0))
        return n
