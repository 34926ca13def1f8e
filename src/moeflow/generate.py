"""`moeflow generate`: one prompt's text streamed to stdout, its figures (speeds, TTFT, memory, experts) to stderr."""

from __future__ import annotations

import sys

from moeflow.engine.budget import gib
from moeflow.engine.sequence import SamplingParams
from moeflow.flags import (DEFAULT_PROMPT, ENGINE, SAMPLING, check_context, context_flag, device_flags,
                           gpus_flag, model_flag, sampling_flags)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    model_flag(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue (with --chat: the user message)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--system", help="system message (needs --chat)")
    sampling_flags(g, SAMPLING["max_new_tokens"], SAMPLING["temperature"], SAMPLING["top_p"],
                   "greedy by default: reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="always produce --max-new-tokens tokens")
    context_flag(g, "context to reserve (default: prompt + new tokens, at least 256)")
    device_flags(g)
    gpus_flag(g)
    g.set_defaults(func=run)


def run(args) -> int:
    from moeflow.dist.cli import engine_class, spread
    from moeflow.engine.llm_engine import encode_prompt
    from moeflow.launch import load_checkpoint, offload_config
    from moeflow.perf.profile import engine_costs

    if (rc := spread(args)) is not None:  # --gpus: on the ranks
        return rc
    offload = offload_config(args)
    ck = load_checkpoint(args, args.device or ENGINE.resolved_device(), offload)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    n_prompt = len(encode_prompt(ck.tokenizer, prompt))
    check_context(args, ck.cfg.max_position_embeddings, n_prompt)
    engine = engine_class()(ck, max_seqs=1, max_len=args.max_len or max(n_prompt + args.max_new_tokens + 1, 256),
                       offload=offload, expert_costs=engine_costs(ck, offload), deterministic=args.deterministic)
    last = None
    for last in engine.stream(prompt, params):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(summary(ck.name, engine.device.type, last), file=sys.stderr)
    return 0


def summary(name: str, device: str, last) -> str:
    """The closing line: prompt, speeds, TTFT, peak memory and, offloaded, the experts' figures."""
    return (f"[{name} on {device} | prompt {last.prompt_tokens} tok | "
            f"prefill {last.prefill_tps:.1f} tok/s | decode {last.decode_tps:.1f} tok/s "
            f"({last.generation_tokens} tok, {last.finish_reason}) | TTFT {last.ttft_s * 1000:.0f} ms | "
            f"peak {'GPU' if device == 'cuda' else 'host'} memory {gib(last.peak_memory)}"
            + (expert_figures(last.experts) if last.experts else "") + "]")


def expert_figures(e: dict) -> str:
    return (f" | experts: hit rate {e['hit_rate']:.0%}, CPU {e['cpu_experts'] / max(e['lookups'], 1):.0%}, "
            f"copied {e['copied_experts'] / max(e['lookups'], 1):.0%}, {e['bytes_h2d'] / 2**30:.2f} GiB to the GPU")
