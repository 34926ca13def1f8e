"""What an offloaded layer plans (LayerPlan: where each selected expert is, the CPU's rows of each missing one)
and what a run counts (OffloadStats: hits, CPU and copied experts, host timers, prefetches used and wasted).

Legend: N = tokens, K = experts per token, I = intermediate rows, (l, e) = expert key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moeflow.perf.costs import ExpertCosts

@dataclass
class OffloadStats:
    lookups: int = 0          # experts selected, counted once per layer call
    hits: int = 0             # of those, found on the GPU (resident or cached)
    resident_hits: int = 0
    cpu_experts: float = 0.0  # experts computed on the CPU (a split one counts its fraction)
    copied_experts: float = 0.0
    bytes_h2d: int = 0        # expert weights copied host -> GPU
    miss_bytes: int = 0       # weights of the experts that were not on the GPU when needed
    # where the host's time goes (seconds): in the backend in all, waiting for the GPU at the per-layer sync,
    # planning (the sync to the plan made), launching (the copies, handing the CPU's share over, the GPU waves,
    # the policy's prefetch), the CPU worker busy on experts (of which inside the native kernel), and waiting for
    # that worker once all is launched; cpu_start: from handing the CPU's share over to the worker starting on
    # it (the GIL, a wake-up)
    backend_s: float = 0.0
    sync_s: float = 0.0
    plan_s: float = 0.0
    launch_s: float = 0.0
    cpu_s: float = 0.0
    cpu_kernel_s: float = 0.0
    cpu_wait_s: float = 0.0
    cpu_start_s: float = 0.0
    prefetch_s: float = 0.0   # of launch_s: in the policy's prefetch hook (matching, picking, copies ahead)
    prefetched: int = 0       # whole experts copied ahead at a policy's request (their bytes are in bytes_h2d)
    prefetch_used: int = 0    # of those, selected when their layer came (the next time it came)
    prefetch_wasted: int = 0  # ... not selected then, or overwritten before it came
    cpu_probes: int = 0       # layers whose CPU share was a probe of the CPU estimate (experts/calibration.py)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate}


@dataclass
class LayerPlan:
    """A layer's call planned: its routing entries by expert, where each selected expert is, and the policy's
    rows on the CPU for each missing one (I: all, 0: copied whole)."""

    layer: int                # the MoE layer's row in the store
    inter: int                # I
    entries: dict             # expert -> its flat (token, k) indices: a list, or numpy in a prompt
    found: dict[int, int | None]  # selected expert -> its slot, None where missing; in expert order
    rows: dict[int, int] = field(default_factory=dict)  # missing expert -> its rows on the CPU
    costs: ExpertCosts | None = None  # the corrected costs the plan used (None: nothing planned)
    probe: bool = False       # its CPU share tests the CPU estimate (experts/calibration.py)
    # from found, once (each is read several times a layer): the held experts' slots, the missing ones' tokens
    held: dict[int, int] = field(init=False)
    misses: dict[int, int] = field(init=False)

    def __post_init__(self):
        self.held = {e: s for e, s in self.found.items() if s is not None}
        self.misses = {e: len(self.entries[e]) for e, s in self.found.items() if s is None}

    @property
    def cpu_jobs(self) -> list[tuple]:
        return [(e, r, self.entries[e]) for e, r in self.rows.items() if r > 0]

    @property
    def copies(self) -> dict[int, int]:
        return {e: r for e, r in self.rows.items() if r < self.inter}
