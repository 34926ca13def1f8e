"""What an offloading policy decides: how the GPU's expert slots are used, and where each missing expert runs.

Legend: S = expert slots the GPU budget holds, L = MoE layers, E = experts per layer, I = intermediate rows.
A plan maps each missing expert of a layer to the number of its intermediate rows the CPU computes:
I = all on the CPU, 0 = its weights copied to the GPU, in between = split (the GPU copies the rest).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from moeflow import MoeflowError
from moeflow.perf.costs import ExpertCosts


@dataclass(frozen=True)
class SlotSplit:
    resident: int            # slots pinned to the most popular experts for the whole run
    cache: int               # slots for copied experts, under the eviction policy
    per_layer: bool = False  # cache partitioned per layer (mixtral-offloading) instead of shared
    keep_copies: bool = True  # a copied expert stays cached; False: the slot is scratch (Fiddler)
    # the resident slots follow use: a whole copied expert takes the slot of the held expert the eviction
    # policy ranks lowest, when it admits it; the cache slots are then scratch for the others
    adaptive: bool = False
    # adaptive: a copy that lands in a scratch slot stays findable there until the slot is taken again (fmoe's
    # prefetch pool); False: a scratch slot is forgotten once its layer has run
    scratch_keeps: bool = False


class Prefetcher(Protocol):
    """What a policy's prefetch() may ask of the offloaded backend (experts/offload.py, OffloadedExperts)."""

    shape: tuple[int, int]  # (MoE layers, experts per layer)
    layer_copied: float     # the layer being launched: its own copies, in whole experts

    def holds(self, key: tuple[int, int]) -> bool:
        """Expert (l, e) is in a GPU slot (or on its way there)."""

    def copy_s(self) -> float:
        """Seconds one whole expert's copy takes (0 where unknown)."""

    def miss_s(self) -> float:
        """Seconds a lone one-token miss costs a layer by its cheaper path (0 where unknown)."""

    def copy_ahead(self, key: tuple[int, int], protect: Collection[tuple[int, int]] = ()) -> bool:
        """Copy expert (l, e) whole into a cache slot on the copy stream, evicting none of `protect`; False
        where held, not kept, or nothing could make room."""

    def copy_ahead_many(self, keys: list[tuple[int, int]], protect: set[tuple[int, int]]) -> int:
        """A batch of whole experts (nearest layer first) copied ahead in one pass; how many were issued."""

    def ahead_in_flight(self) -> bool:
        """The last batch copied ahead has not landed yet."""


class OffloadPolicy(ABC):
    name: str
    needs_costs = False  # plans from measured costs (the backend measures them at start)
    uses_cpu = True      # may plan rows on the CPU (else the activations need not come to the host)
    eviction = "lru"     # the eviction policy of its cache (policy/eviction.py)
    # the share of selected experts found on the GPU whatever the routing (1: every expert, 0: none);
    # None: the routing and the slots decide (the timing model reads it)
    gpu_share: float | None = None
    modelled = True      # the timing model (perf/model.py) predicts it: `moeflow plan` weighs it

    def min_slots(self, layers: int, experts: int, top_k: int) -> int:
        """Fewest slots the policy can run with (room to copy one token's experts of a layer)."""
        return top_k

    @abstractmethod
    def split(self, slots: int, layers: int, experts: int, top_k: int) -> SlotSplit:
        """How to use the S slots; may raise MoeflowError when S cannot work for this policy."""

    @abstractmethod
    def plan(self, misses: dict[int, int], costs: ExpertCosts, inter: int, max_copies: int,
             keep: Collection[int] = ()) -> dict[int, int]:
        """misses: expert -> tokens routed to it (its weights are not on the GPU); keep: those of them the
        cache would keep if copied whole (its eviction policy ranks them above an expert it holds).
        Returns expert -> intermediate rows computed on the CPU (0..inter). At most max_copies experts may
        have rows copied (the slots available in this layer)."""

    def prefetch(self, layer: int, ids, weights, experts: Prefetcher) -> None:
        """Called once per MoE layer (l = `layer`, its row in the store) after the layer's own copies and GPU
        work are issued, with its routing on the host (ids, weights [N, K]: numpy views, valid during the call;
        ids may be float32, exact): a policy that predicts the experts of later layers or steps asks
        experts.copy_ahead((l', e)) for them; they land while the GPU computes. Default: nothing."""

    def prefetches(self) -> bool:
        """prefetch() does something (the backend skips the call and its arguments where not)."""
        return type(self).prefetch is not OffloadPolicy.prefetch

    def use_maps(self, path: str, layers: int, experts: int) -> None:
        """Start from the expert maps in `path` (--expert-maps); only a policy that predicts from maps takes them."""
        raise MoeflowError(f"--expert-maps needs policy fmoe, not {self.name}")


def all_cpu(misses: dict[int, int], inter: int) -> dict[int, int]:
    return {e: inter for e in misses}
