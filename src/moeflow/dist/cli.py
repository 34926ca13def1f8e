"""`--gpus N` for generate, chat and serve: the command runs on N ranks. Rank 0 runs it as usual, with a
DistEngine in place of LLMEngine; the other ranks load the same checkpoint and follow rank 0's steps."""

from __future__ import annotations

import functools

from moeflow.dist.engine import DistEngine, stop_followers
from moeflow.dist.groups import Ranks, current
from moeflow.dist.launch import DistConfig, launch
from moeflow.engine.llm_engine import LLMEngine


def spread(args) -> int | None:
    """With --gpus and not yet on a rank: run the command on the ranks, returning its exit status; else None."""
    if not getattr(args, "gpus", None) or current() is not None:
        return None
    from moeflow.config import EngineConfig

    device = args.device or EngineConfig().resolved_device()
    launch(functools.partial(_rank_command, args), DistConfig(args.gpus, device))
    return 0


def engine_class(args):
    """LLMEngine, or on a rank the DistEngine bound to it."""
    ranks = current()
    return LLMEngine if ranks is None else functools.partial(DistEngine, ranks=ranks)


def experts_on_host(args) -> bool:
    """Whether the experts load in host memory for the ranks to take their shares from."""
    return (getattr(args, "gpus", None) or 1) > 1


def _rank_command(args, ranks: Ranks) -> None:
    if ranks.leader:
        args.func(args)
        stop_followers(ranks)  # its engine may not have been closed
        return
    from moeflow.cli import _load_checkpoint, _offload_config
    from moeflow.config import EngineConfig

    ck = _load_checkpoint(args, args.device or EngineConfig().resolved_device(), _offload_config(args))
    engine = DistEngine(ck, ranks)
    try:
        engine.follow()
    finally:
        engine.close()

