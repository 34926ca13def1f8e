"""One process per rank, started and watched by moeflow itself (the user types one command).

The parent picks a free port on localhost for the rendezvous, spawns `world` processes and waits. When a rank
dies or fails, torch.multiprocessing's join stops the others at once and the parent raises one MoeflowError
naming the rank; a rank stuck in a collective fails by the groups' timeout (groups.py) and is caught the same
way. A rank's own MoeflowError (bad input) is printed by that rank on one line, exit status 2.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from moeflow import MoeflowError
from moeflow.dist.groups import Ranks, close_ranks, init_ranks
from moeflow.experts.cpu import physical_cores

BAD_INPUT = 2  # a rank's exit status after printing its MoeflowError
FOLLOWERS_GRACE_S = 30  # how long the other ranks may take to stop after rank 0 has ended


@dataclass(frozen=True)
class DistConfig:
    world: int              # processes: one per GPU (or CPU processes with gloo, in tests)
    device: str = "cuda"    # cuda: rank r on cuda:r; cpu: gloo
    timeout_s: float = 300  # the longest a collective waits for the other ranks (loading included)
    share_gpus: bool = False  # tests: several ranks per GPU, the activations over gloo

    def check(self) -> None:
        if self.world < 1:
            raise MoeflowError(f"--gpus must be at least 1, not {self.world}")
        if self.device == "cuda":
            have = torch.cuda.device_count()
            if have < self.world and not (self.share_gpus and have):
                raise MoeflowError(f"--gpus {self.world} asks for {self.world} GPUs; this host has {have}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[[Ranks], object], cfg: DistConfig) -> None:
    """Run fn(ranks) on every rank; returns when all have, raises MoeflowError when one fails."""
    cfg.check()
    port = free_port()
    ctx = mp.start_processes(_rank_main, args=(fn, cfg, port), nprocs=cfg.world, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=1):
            if ctx.processes[0].exitcode == 0:  # rank 0 is done: the others stop on its word, else are stopped
                _stop(ctx, grace_s=FOLLOWERS_GRACE_S)
                return
    except KeyboardInterrupt:  # Ctrl-C reaches the ranks too: rank 0 shuts down; what does not is stopped
        _stop(ctx, grace_s=10)
        raise
    except mp.ProcessExitedException as e:
        if e.exit_code == BAD_INPUT:  # the rank printed its error
            raise SystemExit(BAD_INPUT) from None
        raise MoeflowError(f"rank {e.error_index} stopped ({_status(e.exit_code)}); the other ranks were "
                           "stopped") from None
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        raise MoeflowError(f"rank {e.error_index} failed: {last}; the other ranks were stopped") from None


def _stop(ctx, grace_s: float) -> None:
    """Wait up to grace_s for the ranks to end, then terminate (and kill) those that did not."""
    deadline = time.monotonic() + grace_s
    for p in ctx.processes:
        p.join(max(deadline - time.monotonic(), 0))
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()


def _status(code: int | None) -> str:
    return f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def core_share(rank: int, world: int) -> set[int] | None:
    """The CPUs of rank's share of this process's physical cores (contiguous cores, SMT siblings together);
    None where there are fewer cores than ranks."""
    cores: dict[str, set[int]] = {}
    for c in sorted(os.sched_getaffinity(0)):
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = str(c)
        cores.setdefault(key, set()).add(c)
    groups = list(cores.values())
    if len(groups) < world:
        return None
    per = len(groups) // world
    return set().union(*groups[rank * per:(rank + 1) * per])


def _rank_main(rank: int, fn: Callable[[Ranks], object], cfg: DistConfig, port: int) -> None:
    if rank:  # Ctrl-C is rank 0's to handle (a server shuts down); the others stop when it does
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # NCCL: a timed-out collective ends the process
    if hasattr(os, "sched_setaffinity") and (share := core_share(rank, cfg.world)):
        # each rank's CPU work (its experts' CPU share, PyTorch's threads) on its own cores, not all on all
        os.sched_setaffinity(0, share)
        torch.set_num_threads(physical_cores())
    try:
        ranks = init_ranks(rank, cfg.world, port, cfg.device, cfg.timeout_s, cfg.share_gpus)
        try:
            fn(ranks)
        finally:
            close_ranks()
    except MoeflowError as e:
        print(f"moeflow: error: {e}" + (f" (rank {rank})" if rank else ""), file=sys.stderr)
        sys.stderr.flush()
        os._exit(BAD_INPUT)
    # done: the interpreter's teardown is skipped, where gloo's threads can outlive the process group and
    # abort a rank whose work is finished ("terminate called without an active exception", pytorch#190489)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
