"""This process's place among the ranks: the process groups and the two collectives the model needs.

Activations are all-reduced over the device group (NCCL on CUDA, gloo on the CPU); rank 0's step messages
travel over a gloo group of CPU tensors, so reading one never syncs a GPU stream (vLLM keeps its metadata on
such a group too). Every collective carries the groups' timeout: a rank that stops answering fails the
others' next collective instead of hanging them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device
    group: object    # the device group: activations' all-reduce
    control: object  # gloo, CPU tensors: rank 0's step messages (no deadline: rank 0 may idle)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks in place (a no-op for one rank); x is returned."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor t copied into every rank's t (same shape and dtype)."""
        dist.broadcast(t, 0, group=self.control)
        return t

    def broadcast_object(self, obj=None):
        """Rank 0's picklable object, on every rank (setup only: pickling is slow)."""
        box = [obj]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]


def init_ranks(rank: int, world: int, port: int, device_type: str, timeout_s: float,
               share_gpus: bool = False) -> Ranks:
    """Join the rendezvous on localhost:port; cuda: this rank's GPU is cuda:rank. share_gpus (tests on a host with
    fewer GPUs than ranks): rank r on cuda:(r mod GPUs), the activations over gloo (NCCL takes one rank per GPU)."""
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count() if share_gpus else rank)
        torch.cuda.set_device(device)
        backend = "gloo" if share_gpus else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout, **({"device_id": device} if backend == "nccl" else {}))
    # rank 0 may be idle for long (a server between requests): the others wait on the control group without a
    # deadline; a rank that dies is caught by the launcher (launch.py), which stops the rest
    control = dist.new_group(backend="gloo", timeout=IDLE)
    # one all-reduce now: the device group's communicator is made (and a broken one fails) before any loading
    dist.all_reduce(torch.zeros(1, device=device))
    global _CURRENT
    _CURRENT = Ranks(rank, world, device, dist.group.WORLD, control)
    return _CURRENT


IDLE = timedelta(days=30)
_CURRENT: Ranks | None = None  # this process's place, once init_ranks has run (as torch.distributed's own state)


def current() -> Ranks | None:
    return _CURRENT


def close_ranks() -> None:
    global _CURRENT
    _CURRENT = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_seconds(ranks: Ranks, numel: int, dtype: torch.dtype = torch.bfloat16, runs: int = 50) -> float:
    """The median time of one all-reduce of numel elements over the device group (every rank calls this)."""
    import statistics
    import time

    x = torch.zeros(numel, dtype=dtype, device=ranks.device)
    times = []
    for _ in range(runs + 5):
        if ranks.device.type == "cuda":
            torch.cuda.synchronize(ranks.device)
        t = time.perf_counter()
        dist.all_reduce(x, group=ranks.group)
        if ranks.device.type == "cuda":
            torch.cuda.synchronize(ranks.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:])
