"""SlotCache: which expert each GPU slot of the offloaded backend holds, under an eviction policy.

Legend: (l, e) = expert key with l the MoE layer's row in the store.
"""

from __future__ import annotations

from collections.abc import Collection

from moeflow.policy.base import SlotSplit
from moeflow.policy.eviction import EVICTION

Key = tuple[int, int]


class SlotCache:
    """Which expert each GPU slot holds. Resident slots never change (unless the split is adaptive); cache
    slots follow the eviction policy, in one shared group or one group per layer.

    Adaptive: every selected expert counts as used, every held expert is a candidate, and a copied expert
    takes the lowest-ranked one's slot when the eviction policy admits it (else it goes to a scratch slot).
    prior: (l, e) -> uses per step from a popularity profile, the eviction policy's starting point."""

    def __init__(self, resident: list[Key], split: SlotSplit, layers: int, eviction: str = "lru",
                 prior: dict[Key, float] | None = None):
        if split.adaptive and split.per_layer:
            raise ValueError("an adaptive split shares its scratch slots: per_layer must be off")
        self.where: dict[Key, int] = {k: i for i, k in enumerate(resident)}
        self.adaptive = split.adaptive
        self.resident = set(resident)  # adaptive: those of them still held
        cache = list(range(len(resident), len(resident) + split.cache))
        self.groups = ({g: cache[g::layers] for g in range(layers)} if split.per_layer else {None: cache})
        self.holder: dict[int, Key | None] = dict.fromkeys(cache)
        self.per_layer = split.per_layer
        # adaptive: experts copied ahead into scratch slots, findable until their layer comes (stage())
        self.staged: dict[Key, int] = {}
        self.scratch_keeps = split.adaptive and split.scratch_keeps
        self._filled: dict[int, int] = {}  # scratch slot -> when it was last filled (scratch_keeps)
        self._fills = 0
        self.learning = True  # see begin()
        # the eviction policy of each group: per layer, one each (a victim is then the first of its own layer's
        # order, not found in a scan of every layer's); self.eviction is the shared group's
        self.evictions = {g: EVICTION[eviction]() for g in self.groups}
        self.eviction = self.evictions.get(None)
        self._empty = {g: len(slots) for g, slots in self.groups.items()}  # non-adaptive: empty slots per group
        for key, rate in (prior or {}).items():
            self.evictions[key[0] if self.per_layer else None].seed(key, rate)
        if self.adaptive:
            for key in resident:
                self.eviction.hold(key)

    def begin(self, layer: int, broad: bool) -> None:
        """A layer of a step starts; layer 0 ticks the eviction policy's clock. broad: the step's tokens can
        select every expert (a prompt): an adaptive split neither counts its uses nor keeps its copies, since
        such a step says nothing about which experts to keep, and its copies would take the slots of experts
        the same step needs in later layers (measured: Mixtral's prefill hit 6% instead of 23%)."""
        if layer == 0:
            for ev in self.evictions.values():
                ev.tick()
        self.learning = not (self.adaptive and broad)

    def holds(self, key: Key) -> bool:
        return key in self.where or key in self.staged

    def lookup(self, key: Key) -> int | None:
        slot = self.where.get(key)
        if slot is None and self.staged:
            slot = self.staged.get(key)
        if (self.adaptive and self.learning) or (slot is not None and key not in self.resident):
            (self.evictions[key[0]] if self.per_layer else self.eviction).touch(key)
        return slot

    def keepers(self, keys: list[Key], protect: set[Key]) -> set[Key]:
        """Those of `keys` (not held) that, copied in whole now, would be kept in the slot of the held expert
        ranked lowest outside `protect` (an adaptive split that is learning)."""
        if not (self.adaptive and self.learning and self.where):
            return set()
        victim = self.eviction.victim(self.where.keys(), protect)
        if victim is None or victim in protect:
            return set()
        return set(self.eviction.admitted([k for k in keys if k not in self.where], victim))

    def capacity(self, layer: int) -> int:
        return len(self.groups[layer if self.per_layer else None])

    def take(self, key: Key, protect: set[Key], keep: bool, busy: set[int] = frozenset()) -> int:
        """A slot for `key` (about to be copied in), evicting if the group is full. Free slots not `busy`
        (in use in this layer) come first."""
        if self.adaptive:
            return self._take_adaptive(key, protect, keep and self.learning, busy)
        g = key[0] if self.per_layer else None
        ev = self.evictions[g]
        if self._empty[g]:  # the first empty slot not busy, else the first empty one
            slot = sorted((s for s in self.groups[g] if self.holder[s] is None), key=lambda s: s in busy)[0]
        else:  # the group's held experts are those held in its eviction policy, found in `where`
            victim = ev.victim(self.where.keys(), protect)
            slot = self.where.pop(victim)
            ev.remove(victim)
        self._empty[g] += (not keep) - (self.holder[slot] is None)
        self.holder[slot] = key if keep else None
        if keep:
            self.where[key] = slot
            ev.hold(key)
            ev.touch(key)
        return slot

    def _take_adaptive(self, key: Key, protect: set[Key], keep: bool, busy: set[int]) -> int:
        victim = self._admitted_victim(key, protect) if keep else None
        if victim is not None:
            return self._replace(victim, key)
        if self.scratch_keeps:
            return self._scratch(key, protect, keep, busy)
        slot = min(self.groups[None], key=lambda s: (s in busy, self.holder[s] is not None))  # scratch
        self._unstage(slot)
        return slot

    def stage(self, key: Key, avoid: Collection[int] = ()) -> int | None:
        """Adaptive: a scratch slot for `key`, copied ahead of its layer (a guess: no resident is evicted for it),
        findable by lookup() until its layer comes (end_layer) or a copy takes the slot; None where every
        scratch slot holds a staged expert. Slots in `avoid` (the current layer's) come last."""
        free = [s for s in self.groups[None] if self.holder[s] is None]
        if not self.adaptive or key in self.where or key in self.staged or not free:
            return None
        slot = min(free, key=lambda s: s in avoid)
        self.staged[key], self.holder[slot] = slot, key
        return slot

    def end_layer(self, layer: int, used: Collection[Key] = (), protect: set[Key] = frozenset()) -> None:
        """Layer `layer`'s lookups are done: its staged experts are spent. One in `used` (selected now) stays
        where the eviction policy admits it in place of the held expert it ranks lowest outside `protect`, with no
        copy: the two slots trade roles (the victim's becomes scratch). The others' slots are free again (their
        weights there until a copy takes them)."""
        for key in [k for k in self.staged if k[0] == layer]:
            slot = self.staged[key]
            if not (key in used and self.learning and self._promote(key, slot, protect)):
                self._unstage(slot)

    def _promote(self, key: Key, slot: int, protect: set[Key]) -> bool:
        victim = self._admitted_victim(key, protect)
        if victim is None:
            return False
        held = self.where.pop(victim)
        self.eviction.remove(victim)
        self.resident.discard(victim)
        del self.staged[key], self.holder[slot]
        self.where[key] = slot
        self.eviction.hold(key)
        scratch = self.groups[None]
        scratch[scratch.index(slot)] = held
        self.holder[held] = None
        return True

    def prefetch_slots(self, keys: list[Key], protect: set[Key], busy: Collection[int]) -> list[tuple[Key, int]]:
        """A scratch pool (scratch_keeps): slots for a batch of experts copied ahead, in one pass. Each goes
        where the eviction policy admits it in place of a held expert (tried until the first refusal), else to
        a scratch slot (empty first, then the one filled longest ago), never one `busy` in this layer nor one
        holding a protected expert. Keys already held are skipped; the batch stops where no slot is left."""
        free = sorted((s for s in self.groups[None] if s not in busy and self.holder[s] not in protect),
                      key=lambda s: (self.holder[s] is not None, self._filled.get(s, -1)))
        out, admit, n = [], self.learning, 0
        for key in keys:
            if key in self.where or key in self.staged:
                continue
            if admit and self.where:
                victim = self._admitted_victim(key, protect)
                admit = victim is not None
                if admit:
                    out.append((key, self._replace(victim, key)))
                    continue
            if n == len(free):
                break
            slot, n = free[n], n + 1
            self._fill(slot, key)
            out.append((key, slot))
        return out

    def _admitted_victim(self, key: Key, protect: set[Key]) -> Key | None:
        """The held expert `key` would replace: the one the eviction policy ranks lowest outside `protect`,
        where it admits `key` in its place; else None."""
        victim = self.eviction.victim(self.where.keys(), protect) if self.where else None
        if victim is None or victim in protect or not self.eviction.admits(key, victim):
            return None
        return victim

    def _replace(self, victim: Key, key: Key) -> int:
        """`key` takes the slot of held expert `victim` (resident or cached), which is no longer held."""
        slot = self.where.pop(victim)
        self.eviction.remove(victim)
        self.resident.discard(victim)
        self.where[key] = slot
        self.eviction.hold(key)
        return slot

    def _fill(self, slot: int, key: Key | None) -> None:
        """Scratch slot `slot` now holds `key` (None: nothing findable); the expert it held is found there no more."""
        old = self.holder[slot]
        if old is not None and self.where.get(old) == slot:
            del self.where[old]
        self.holder[slot] = key
        if key is not None:
            self.where[key] = slot
        self._fills += 1
        self._filled[slot] = self._fills

    def _unstage(self, slot: int) -> None:
        key = self.holder.get(slot)
        if key is not None and self.staged.get(key) == slot:
            del self.staged[key]
            self.holder[slot] = None

    def _scratch(self, key: Key, protect: set[Key], keep: bool, busy: set[int]) -> int:
        """A scratch slot that keeps `key` findable until it is taken again: an empty one first, else the one
        filled longest ago, avoiding slots busy in this layer and holders in `protect`."""
        slot = min(self.groups[None], key=lambda s: (s in busy, self.holder[s] in protect,
                                                     self.holder[s] is not None, self._filled.get(s, -1)))
        self._unstage(slot)
        keep = keep and self.holder[slot] not in protect  # every slot holds a protected expert: not kept
        self._fill(slot, key if keep else None)
        return slot
