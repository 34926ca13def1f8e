"""`--gpus N` for generate, serve and bench latency: the command runs on N ranks. Rank 0 runs it as usual, with a
DistEngine in place of LLMEngine; the other ranks load the same checkpoint and follow rank 0's steps."""

from __future__ import annotations

import functools

from moeflow import MoeflowError
from moeflow.dist.engine import DistEngine, follow, stop_followers
from moeflow.dist.groups import Ranks, current
from moeflow.dist.launch import DistConfig, launch
from moeflow.engine.llm_engine import LLMEngine


def spread(args) -> int | None:
    """With --gpus and not yet on a rank: run the command on the ranks, returning its exit status; else None."""
    if getattr(args, "gpus", None) is None or current() is not None:
        return None
    if args.gpus > 1:  # what one device needs, refused before any process starts
        for flag in ("baseline_tokens", "deterministic", "routing_trace", "expert_maps"):
            if getattr(args, flag, None):
                raise MoeflowError(f"--{flag.replace('_', '-')} runs on one GPU: not with --gpus above 1 yet")
    from moeflow.config import EngineConfig

    device = args.device or EngineConfig().resolved_device()
    launch(functools.partial(_rank_command, args), DistConfig(args.gpus, device))
    return 0


def engine_class():
    """LLMEngine, or on a rank the DistEngine bound to it."""
    ranks = current()
    return LLMEngine if ranks is None else functools.partial(DistEngine, ranks=ranks)


def owned_experts(args):
    """[MoE layers, E] the experts this rank keeps in host memory (an even share; --placement spreads the popular
    ones); None: not one of several ranks."""
    ranks = current()
    if ranks is None or ranks.world == 1:
        return None
    from moeflow.checkpoint import read_model_config
    from moeflow.flags import DEFAULT_MODEL
    from moeflow.dist.ep import owners, placement_counts

    name, cfg = read_model_config(args.model or DEFAULT_MODEL)
    counts = placement_counts(getattr(args, "placement", None), name, cfg)
    return owners(counts, len(cfg.moe_layers), cfg.num_experts, ranks.world) == ranks.rank


def experts_on_host(args) -> bool:
    """Whether the experts load in host memory for the ranks to take their shares from."""
    return (getattr(args, "gpus", None) or 1) > 1


def _rank_command(args, ranks: Ranks) -> None:
    if ranks.leader:
        args.func(args)
        stop_followers(ranks)  # its engine may not have been closed
        return
    from moeflow.checkpoint import load
    from moeflow.flags import DEFAULT_MODEL

    # as rank 0's command loads it (generate, serve, bench latency), the experts in host memory
    ck = load(args.model or DEFAULT_MODEL, device=ranks.device, dtype=args.dtype, expert_device="cpu",
              quant=getattr(args, "quantize", None), progress=False, owned=owned_experts(args))
    follow(ck, ranks)

