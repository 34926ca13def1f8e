"""PromptShape: how a prompt's routing entries spread over a layer's experts, recorded by the offloaded backend
and read by the timing model (perf/model.py, predict_latency's prefill_shape)."""

from __future__ import annotations


class PromptShape:
    """How a prompt's routing entries spread over the experts: per layer of a step of several tokens, the
    experts' token counts from the most used down, averaged over the layers recorded. The timing model spreads
    a prompt's tokens this way (a policy that sends an expert with few tokens to the CPU sees them)."""

    def __init__(self, experts: int):
        self.sums, self.layers = [0.0] * experts, 0

    def reset(self) -> None:
        self.sums, self.layers = [0.0] * len(self.sums), 0

    def add(self, counts: list[int]) -> None:
        for i, n in enumerate(sorted(counts, reverse=True)):
            self.sums[i] += n
        self.layers += 1

    def mean(self) -> list[float]:
        return [s / self.layers for s in self.sums] if self.layers else []
