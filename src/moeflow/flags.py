"""The flags `moeflow`'s commands share, and the checks every command's values pass before anything loads.

Each command's parser lives beside its feature (generate.py, chat.py, server/, perf/commands.py, ...) and builds
on these: the parser class (defaults in --help, a bad flag is one line and exit 2), --model, --device and the
offloading flags, --max-len, the sampling flags.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields

from moeflow import MoeflowError
from moeflow.config import EngineConfig
from moeflow.engine.sequence import SamplingParams

ENGINE = EngineConfig()
DEFAULT_MODEL = ENGINE.model  # the embedded default: a small Mixtral trained on the Python docs, shipped
DEFAULT_PROMPT = "The :mod:`json` module"  # the embedded default continues Python documentation
SAMPLING = {f.name: f.default for f in fields(SamplingParams)}
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help, unless there is none to show or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Defaults in every --help; a bad flag is one `moeflow: error:` line and exit 2, as other errors are."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise MoeflowError(f"{self.prog}: {message}")


def alias(g, old: str, dest: str) -> None:
    """An old spelling kept working, not shown in --help."""
    g.add_argument(old, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def model_flag(g, default: str | None = ENGINE.model) -> None:
    g.add_argument("--model", default=default, help="checkpoint folder, builtin:NAME or synthetic:NAME")


def device_flags(g, offload: bool = True, deterministic: bool = True) -> None:
    g.add_argument("--device", choices=DEVICES, default=ENGINE.device, help="where the model runs (default: cuda "
                   "where available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=ENGINE.dtype,
                   help="auto: bf16 on cuda, the checkpoint's own on cpu")
    if deterministic:
        g.add_argument("--deterministic", action="store_true", default=ENGINE.deterministic,
                       help="batch-invariant forward: a request's greedy output does not depend on the requests "
                            "beside it (costs speed; docs/reliability.md)")
    if offload:
        offload_flags(g)


def offload_flags(g) -> None:
    from moeflow.policy import POLICIES

    g.add_argument("--gpu-memory", help="cap on GPU memory, e.g. 24GiB: experts stay in host memory and run "
                   "on the CPU or are copied in as the policy decides")
    g.add_argument("--policy", default="auto", choices=sorted(POLICIES), help="offloading policy")
    g.add_argument("--placement", help="resident experts from `moeflow profile-experts` (default: even split)")
    g.add_argument("--routing-trace", help="benchmarks: replay a recorded routing instead of the router's")
    g.add_argument("--quantize", help="int4 or int8 (-g32..-g128, -asym, -fp16): quantize the experts at load")
    g.add_argument("--expert-maps", help="policy fmoe: expert-map file to start from and write back to "
                   "(`moeflow maps build`)")


def gpus_flag(g) -> None:
    g.add_argument("--gpus", type=int, help="GPUs of this host to spread the model over, one process each "
                   "(docs/multi-gpu.md); with --device cpu: CPU processes")


def context_flag(g, help: str) -> None:
    g.add_argument("--max-len", type=int, default=ENGINE.max_len, help=help)
    alias(g, "--max-context", "max_len")


def sampling_flags(g, max_new_tokens: int, temperature: float, top_p: float, why: str) -> None:
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy ({why})")
    g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling: keep the most likely tokens "
                   "whose probabilities sum to this (1 = off)")
    g.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="keep the k most likely tokens (0 = off)")
    g.add_argument("--seed", type=int, default=SAMPLING["seed"], help="sampling seed (none: a fresh one each run)")


def check_args(args) -> None:
    """Every value that can be checked without loading anything, before any heavy work."""
    for name in ("max_new_tokens", "new_tokens", "gen_len", "max_len", "max_running", "num_prompts", "max_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise MoeflowError(f"--{name.replace('_', '-')} must be at least 1")
    _check_sampling(args)
    hit = getattr(args, "hit_rate", None)
    if hit is not None and not 0 <= hit <= 1:
        raise MoeflowError(f"--hit-rate is a fraction in [0, 1] (got {hit})")
    if getattr(args, "system", None) and getattr(args, "chat", True) is False:
        raise MoeflowError("--system needs --chat (the system message goes through the chat template)")
    if getattr(args, "gpu_memory", None) is not None and getattr(args, "command", None) != "plan":
        check_gpu_memory(args)
    if getattr(args, "bench", None) == "latency":
        from moeflow.config import parse_size

        [parse_size(b) for b in args.budgets.split(",")]
        if args.runs < 1 or args.repeat < 1:
            raise MoeflowError(f"--runs and --repeat must be at least 1 (got {args.runs} and {args.repeat})")


def _check_sampling(args) -> None:
    t = getattr(args, "temperature", 0)
    if not (math.isfinite(t) and t >= 0):
        raise MoeflowError(f"--temperature must be a finite number >= 0 (got {t})")
    if not 0 < getattr(args, "top_p", 1) <= 1:
        raise MoeflowError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if getattr(args, "top_k", 0) < 0:
        raise MoeflowError(f"--top-k must be >= 0, 0 = off (got {args.top_k})")


def check_gpu_memory(args) -> None:
    import torch

    from moeflow.config import parse_size

    parse_size(args.gpu_memory)
    if getattr(args, "device", None) == "cpu" or not torch.cuda.is_available():
        raise MoeflowError("--gpu-memory caps the GPU's memory: it needs a CUDA GPU (none is visible here, "
                           "or --device cpu)")


def check_context(args, limit: int, n_prompt: int | None = None) -> None:
    """--max-len/--max-context against the model's limit; --max-new-tokens against what the context leaves."""
    v = getattr(args, "max_len", None)
    if v is not None and v > limit:
        raise MoeflowError(f"--max-len {v} is beyond the model's context ({limit} tokens)")
    if n_prompt is not None:
        room = min(args.max_len or limit, limit) - n_prompt - 1
        if 0 < room < args.max_new_tokens:  # (a prompt that does not fit is the engine's one-line error)
            print(f"moeflow: warning: --max-new-tokens {args.max_new_tokens} does not fit the context "
                  f"({n_prompt} prompt tokens of {min(args.max_len or limit, limit)}): at most {room} tokens",
                  file=sys.stderr)
