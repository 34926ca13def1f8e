"""Which cached expert gives up its GPU slot. Resident experts are never candidates."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """key was used (a hit, or it was just copied in)."""

    @abstractmethod
    def remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def victim(self, keys: list[Hashable], protect: set) -> Hashable:
        """Pick one of `keys` (the group's cached experts) to evict, avoiding `protect` where possible."""


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Hashable, None] = OrderedDict()  # least recently used first

    def touch(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, keys, protect):
        candidates = set(keys)
        in_order = [k for k in self.order if k in candidates]
        free = [k for k in in_order if k not in protect]
        return (free or in_order)[0]


EVICTION = {c.name: c for c in (LRU,)}
