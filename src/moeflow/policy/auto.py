"""moeflow's rule: resident experts by popularity; each layer's misses are shared between the CPU and the
copy engine so both finish together, from costs measured on this machine (at most one expert is split).

With the CPU path costing c_e and the copy path p_e (copy plus GPU compute) for expert e, experts are taken
in order of c_e / p_e: the cheapest on the CPU (few tokens) go to the CPU until its load would pass the copy
path's; the expert at the boundary is split by rows so that both paths end at the same time.
"""

from __future__ import annotations

import time

import numpy as np

from moeflow.policy.base import OffloadPolicy, SlotSplit
from moeflow.policy.prefetch_gate import PrefetchGate, break_even

SPLIT_STEPS = 32  # a split falls on a multiple of I/32 rows: few, large transfers
# A whole expert instead of a split one when the layer then takes at most this much longer: a whole copy can
# stay cached (a split one cannot) and is one transfer instead of three (the replays behind the figure:
# docs/history/2026-12-02.md).
WHOLE_SLACK = 0.05
# ... and at most this much longer for an expert the cache would keep (its eviction policy ranks it above one it
# holds): a kept expert saves its next miss, which costs about the layer's time, where a small expert's split
# saves little (docs/history/2026-12-02.md).
KEEP_SLACK = 0.25
# auto-prefetch: a prefetch may run past the copy engine's idle time in the layer by this much of one copy (its
# hit saves a whole miss; its overrun delays the next layer's own copies)
SPILL = 0.5
SMOOTHING = 0.2  # weight of the newest layer in the layer-time estimate
# auto itself copies guesses ahead as auto-prefetch does (the gate keeps it from copying where guesses miss):
# measured no worse where guesses miss and faster where they hit (docs/benchmarks.md)
AUTO_PREFETCH = True


class AutoPolicy(OffloadPolicy):
    name = "auto"
    needs_costs = True
    eviction = "decay"

    prefetching: bool | None = None  # copies guesses ahead (GuessAhead); None: AUTO_PREFETCH, read at start

    def __init__(self, whole_slack: float | None = None, keep_slack: float | None = None,
                 spill: float | None = None):
        # None: the module's constants, read now (experiments set them before the engine makes its policy)
        self.whole_slack = WHOLE_SLACK if whole_slack is None else whole_slack
        self.keep_slack = KEEP_SLACK if keep_slack is None else keep_slack
        on = AUTO_PREFETCH if self.prefetching is None else self.prefetching
        self.ahead = GuessAhead(SPILL if spill is None else spill) if on else None

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
        call, copy = costs.cpu_call(), costs.copy()
        # the costs per token count, not per expert: a decode layer's misses all have one token
        by_n = {n: (costs.cpu_each(n), copy + costs.gpu(n)) for n in set(misses.values())}
        c = {e: by_n[n][0] for e, n in misses.items()}
        p = {e: by_n[n][1] for e, n in misses.items()}
        order = sorted(misses, key=lambda e: c[e] / p[e]) if len(by_n) > 1 else list(misses)
        cpu_load, copy_load = 0.0, self.copy_backlog() + sum(p.values())
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

    def copy_backlog(self) -> float:
        """Seconds the copy engine is still busy with work issued before this layer's copies: the prefetches
        still in flight (the next layer's copies queue behind them)."""
        return self.ahead.backlog() if self.ahead is not None else 0.0

    def prefetches(self) -> bool:
        return self.ahead is not None or type(self).prefetch is not AutoPolicy.prefetch  # fmoe has its own

    def prefetch(self, layer, ids, weights, experts):
        if self.ahead is not None:
            self.ahead(layer, ids, weights, experts)


class AutoPrefetchPolicy(AutoPolicy):
    """auto with its guesses copied ahead whatever AUTO_PREFETCH says (GuessAhead)."""

    name = "auto-prefetch"
    modelled = False  # the timing model has no prefetcher: it would predict auto
    prefetching = True


class GuessAhead:
    """After each decode layer of a lone sequence, the previous token's experts of the next layer (consecutive
    tokens reuse 26-40% of them on real traces) copied ahead while the copy engine is idle: at most as many as
    it moves in the layer's time less the layer's own copies (plus `spill` of one), highest routing weight
    first, into free scratch slots (no resident is evicted for a guess). Gated by the precision p of the guesses
    it has room for, as its PrefetchGate measures it: a copy pays when p x (the miss it saves) > (1 - p) x (the
    copy it wastes)."""

    def __init__(self, spill: float):
        self.spill = spill
        self.last: dict[int, list[int]] = {}  # MoE row -> the last token's experts there, by weight
        self.layer_s, self._t = 0.0, None
        self.busy_until = 0.0  # perf_counter time when the prefetches issued so far should have landed
        self.guessed: dict[int, list[int]] = {}  # MoE row -> its guesses to score when it comes
        # the guesses' precision (of those the copy engine had room for, the share selected when their layer
        # came), scored whether copied or not: a closed gate still sees when guessing pays again
        self.gate = PrefetchGate()
        self._break_even = 1.0  # break_even() of the costs at the last refresh (pays)

    def precision(self) -> float:
        return self.gate.calibration

    def pays(self, experts, refresh: bool = True) -> bool:
        """A guess copied is worth its copy at the precision measured (policy/prefetch_gate.py break_even) of the
        costs as corrected now, or (refresh False) at the last refresh: corrections move slowly."""
        if refresh or self._break_even >= 1.0:
            self._break_even = break_even(experts.miss_s(), experts.copy_s())
        return self.precision() > self._break_even

    def backlog(self) -> float:
        return max(self.busy_until - time.perf_counter(), 0.0)

    def __call__(self, layer, ids, weights, experts):
        if ids.shape[0] != 1:  # a prompt or several sequences: no previous token to follow
            self.last, self.guessed, self._t = {}, {}, None
            return
        now = time.perf_counter()
        if self._t is not None:
            dt = now - self._t
            self.layer_s = self.layer_s + SMOOTHING * (dt - self.layer_s) if self.layer_s else dt
        self._t = now
        picked = [int(e) for e in np.asarray(ids[0]).tolist()]  # numpy on the engine's path (ids may be fp32)
        scored = self.guessed.pop(layer, None)
        if scored:
            self.gate.score(layer, np.asarray(picked), [(layer, e, 1.0) for e in scored])
        self.last[layer] = [e for _, e in sorted(zip(np.asarray(weights[0]).tolist(), picked), reverse=True)]
        L = experts.shape[0]
        nxt = (layer + 1) % L
        holds = experts.holds
        guess = [e for e in self.last.get(nxt, ()) if not holds((nxt, e))]  # the next token's first
        copy_s = experts.copy_s()
        if not guess or copy_s <= 0 or not self.layer_s:
            return
        room = self.layer_s - experts.layer_copied * copy_s + self.spill * copy_s - self.backlog()
        # the guesses the copy engine has room for are scored, copied or not: the precision of what it copies
        self.guessed[nxt] = guess[:max(int(room / copy_s), 0)]
        if not self.pays(experts, refresh=layer == 0):  # the costs refreshed once a token
            return
        for e in self.guessed[nxt]:
            if experts.copy_ahead((nxt, e)):
                self.busy_until = max(self.busy_until, now) + copy_s
