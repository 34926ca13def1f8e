"""A checkpoint and an engine as the command line's flags ask: `generate`, `chat`, `serve` and `batch` load
through here (--model, --device, --dtype, --quantize, and --gpu-memory with its offloading flags)."""

from __future__ import annotations

import sys

from moeflow import MoeflowError
from moeflow.flags import DEFAULT_MODEL, ENGINE, check_context

# tokens per sequence by default where several sequences' KV caches, or the experts, share the GPU's memory
SHARED_CONTEXT = 4096


def offload_config(args):
    """The OffloadConfig of --gpu-memory and its policy flags; None (everything on --device) without it."""
    from moeflow.config import OffloadConfig, parse_size

    if args.gpu_memory is None:
        for flag in ("policy", "placement", "routing_trace", "expert_maps"):
            if getattr(args, flag) not in (None, "auto"):
                raise MoeflowError(f"--{flag.replace('_', '-')} needs --gpu-memory (the offloading engine)")
        return None
    return OffloadConfig(parse_size(args.gpu_memory), args.policy, args.placement, args.routing_trace,
                         expert_maps=args.expert_maps)


def load_checkpoint(args, device, offload):
    """--model (default: the embedded one) on `device`; its experts in host memory when offloading."""
    from moeflow.checkpoint import load, read_model_config
    from moeflow.dist.cli import experts_on_host, owned_experts

    check_context(args, read_model_config(args.model or DEFAULT_MODEL)[1].max_position_embeddings)
    ck = load(args.model or DEFAULT_MODEL, device=device, dtype=args.dtype, progress=None,
              expert_device="cpu" if offload or experts_on_host(args) else None, quant=args.quantize,
              owned=owned_experts(args))
    if ck.synthetic:
        print(f"moeflow: {ck.name} has random weights: expect gibberish", file=sys.stderr)
    return ck


def default_context(args, max_seqs: int, offloading: bool) -> int | None:
    """The context per sequence where --max-len is unset: the model's for one sequence on its own device; else
    at most SHARED_CONTEXT, since max_seqs KV caches of a long context would take the GPU's memory (with
    offloading, the experts' share of --gpu-memory). None: the model's."""
    from moeflow.checkpoint import read_model_config
    from moeflow.dist.groups import current

    if args.max_len is not None or (max_seqs == 1 and not offloading):
        return args.max_len
    ctx = read_model_config(args.model or DEFAULT_MODEL)[1].max_position_embeddings
    if ctx > SHARED_CONTEXT and (current() is None or current().leader):  # said once, not by every rank
        print(f"moeflow: context {SHARED_CONTEXT} tokens per sequence (the model's is {ctx}; "
              "--max-len to choose)", file=sys.stderr)
    return min(SHARED_CONTEXT, ctx)


def load_engine(args, max_seqs: int):
    """The engine of `serve`, `chat` and `batch`: the model on --device (cuda where available), offloaded with
    --gpu-memory."""
    from moeflow.dist.cli import engine_class
    from moeflow.perf.profile import engine_costs

    offload = offload_config(args)
    max_len = default_context(args, max_seqs, offload is not None)
    ck = load_checkpoint(args, args.device or ENGINE.resolved_device(), offload)
    return engine_class()(ck, max_seqs=max_seqs, max_len=max_len, offload=offload,
                     expert_costs=engine_costs(ck, offload), deterministic=args.deterministic)
