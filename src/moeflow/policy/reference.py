"""The two references: every expert on the GPU, or every expert on the CPU (non-expert weights on the GPU)."""

from __future__ import annotations

from moeflow.policy.base import OffloadPolicy, SlotSplit, all_cpu


class GpuPolicy(OffloadPolicy):
    name = "gpu"
    uses_cpu = False
    gpu_share = 1.0

    def min_slots(self, layers, experts, top_k):
        return layers * experts

    def split(self, slots, layers, experts, top_k):
        return SlotSplit(resident=layers * experts, cache=0)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        raise AssertionError("policy gpu never misses")


class CpuPolicy(OffloadPolicy):
    name = "cpu"
    gpu_share = 0.0

    def min_slots(self, layers, experts, top_k):
        return 0

    def split(self, slots, layers, experts, top_k):
        return SlotSplit(resident=0, cache=0)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        return all_cpu(misses, inter)
