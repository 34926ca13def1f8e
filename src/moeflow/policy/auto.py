"""moeflow's rule: resident experts by popularity; each layer's misses are shared between the CPU and the
copy engine so both finish together, from costs measured on this machine (at most one expert is split).

With the CPU path costing c_e and the copy path p_e (copy plus GPU compute) for expert e, experts are taken
in order of c_e / p_e: the cheapest on the CPU (few tokens) go to the CPU until its load would pass the copy
path's; the expert at the boundary is split by rows so that both paths end at the same time.
"""

from __future__ import annotations

from moeflow.policy.base import OffloadPolicy, SlotSplit

SPLIT_STEPS = 32  # a split falls on a multiple of I/32 rows: few, large transfers
# A whole expert instead of a split one when the layer then takes at most this much longer: a whole copy can
# stay cached (a split one cannot) and is one transfer instead of three (the replays behind the figure:
# docs/history/2026-12-02.md).
WHOLE_SLACK = 0.05
# ... and at most this much longer for an expert the cache would keep (its eviction policy ranks it above one it
# holds): a kept expert saves its next miss, which costs about the layer's time, where a small expert's split
# saves little (docs/history/2026-12-02.md).
KEEP_SLACK = 0.25


class AutoPolicy(OffloadPolicy):
    name = "auto"
    needs_costs = True
    eviction = "decay"

    def __init__(self, whole_slack: float | None = None, keep_slack: float | None = None):
        # None: the module's constants, read now (experiments set them before the engine makes its policy)
        self.whole_slack = WHOLE_SLACK if whole_slack is None else whole_slack
        self.keep_slack = KEEP_SLACK if keep_slack is None else keep_slack

    def split(self, slots, layers, experts, top_k):
        # Few cache slots, the rest resident: a copied expert rarely survives in a small shared cache until its
        # layer comes round again, while a resident one always hits. Two slots let a copy land while the GPU
        # computes the last one; a layer with more copies reuses them in turn (measured with the Mixtral trace
        # replayed by the engine: 12% fewer missed expert bytes per token at 220 slots than with 8 cache slots,
        # the same at 62).
        # The resident slots adapt: a copied expert used more than a resident one lately takes its slot.
        cache = min(max(top_k, 2), slots)
        return SlotSplit(resident=slots - cache, cache=cache, adaptive=True)

    def plan(self, misses, costs, inter, max_copies, keep=()):
        if not misses:
            return {}
        # The CPU call's fixed part (hand-over, waking the kernel's threads) is paid once, by the first expert
        # the CPU takes, whole or in part: for small experts (Qwen3's) it is most of what the CPU costs.
        call = costs.cpu_call()
        c = {e: costs.cpu_each(n) for e, n in misses.items()}
        p = {e: costs.copy() + costs.gpu(n) for e, n in misses.items()}
        order = sorted(misses, key=lambda e: c[e] / p[e])
        cpu_load, copy_load = 0.0, sum(p.values())
        rows = {}
        for e in order:
            copy_load -= p[e]
            base = cpu_load or call  # where the CPU's time would start from with e on it
            if base + c[e] <= copy_load:  # the whole expert fits on the CPU before copies end
                rows[e], cpu_load = inter, base + c[e]
                continue
            # Split e: the CPU takes fraction f with base + f c = copy_load + (1 - f) p.
            f = min(max((copy_load + p[e] - base) / (c[e] + p[e]), 0.0), 1.0)
            step = max(inter // SPLIT_STEPS, 1)
            rows[e] = min(round(f * inter / step) * step, inter)
            split_s = max(base + f * c[e] if f > 0 else cpu_load, copy_load + (1 - f) * p[e])
            if max(cpu_load, copy_load + p[e]) <= (1 + (self.keep_slack if e in keep else self.whole_slack)) * split_s:
                rows[e] = 0  # copied whole
            elif max(base + c[e], copy_load) <= (1 + self.whole_slack) * split_s:
                rows[e] = inter
            rows.update({rest: 0 for rest in order[order.index(e) + 1:]})
            break
        return rows  # more copies than slots: the backend reuses a slot once its expert is computed
