"""Fiddler's published rule: the most popular experts resident; a miss with few tokens runs on the CPU,
otherwise its weights are copied to a GPU placeholder for this use only (not cached)."""

from __future__ import annotations

from moeflow.policy.base import OffloadPolicy, SlotSplit


class FiddlerPolicy(OffloadPolicy):
    name = "fiddler"
    threshold = 10  # tokens; the public code's constant, not calibrated

    def split(self, slots, layers, experts, top_k):
        scratch = min(top_k, slots)  # placeholders for copies; the rest resident
        return SlotSplit(resident=slots - scratch, cache=scratch, keep_copies=False)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        return {e: inter if n < self.threshold else 0 for e, n in misses.items()}
