"""mixtral-offloading's rule: no CPU compute; every miss is copied into a per-layer LRU cache of experts."""

from __future__ import annotations

from moeflow.policy.base import OffloadPolicy, SlotSplit


class LruPolicy(OffloadPolicy):
    name = "lru"
    uses_cpu = False

    def min_slots(self, layers, experts, top_k):
        return layers  # each layer's cache needs a slot of its own

    def split(self, slots, layers, experts, top_k):
        return SlotSplit(resident=0, cache=slots, per_layer=True)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        # More misses than free slots: the executor reuses a slot once its last expert is done.
        return {e: 0 for e in misses}
