"""The `moeflow` command: generate | synth | bench generate | train-demo."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from moeflow import MoeflowError, __version__
from moeflow.engine.sequence import SamplingParams

DEFAULT_MODEL = "synthetic:tiny-mixtral"  # the embedded default: needs no download
DEFAULT_PROMPT = "Explain in one paragraph why mixture-of-experts models are cheap to run."
_SP = {f.name: f.default for f in fields(SamplingParams)}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cmd_generate(args) -> int:
    from moeflow.checkpoint import load
    from moeflow.engine.llm_engine import LLMEngine, encode_prompt

    ck = load(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, progress=None)
    if ck.synthetic:
        print(f"moeflow: {ck.name} has random weights (no trained model is embedded yet): expect gibberish",
              file=sys.stderr)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    n_prompt = len(encode_prompt(ck.tokenizer, prompt))
    engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len or max(n_prompt + args.max_new_tokens + 1, 256))
    last = None
    for last in engine.stream(prompt, params):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{ck.name} on {engine.device.type} | prompt {last.prompt_tokens} tok | "
          f"prefill {last.prefill_tps:.1f} tok/s | decode {last.decode_tps:.1f} tok/s "
          f"({last.generation_tokens} tok, {last.finish_reason}) | TTFT {last.ttft_s * 1000:.0f} ms | "
          f"peak {'GPU' if engine.device.type == 'cuda' else 'host'} memory {_gib(last.peak_memory)}]",
          file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    from pathlib import Path

    from moeflow.synthetic import build_synthetic, write_checkpoint

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoeflowError(f"--out {out} exists and is not a folder")
    ck = build_synthetic(args.name.removeprefix("synthetic:"), dtype=args.dtype)
    write_checkpoint(ck, out)
    print(f"wrote {ck.name} ({_gib(ck.store.nbytes + ck.dense_bytes)}) to {args.out}")
    return 0


def cmd_bench(args) -> int:
    from moeflow.bench.generate import bench_generate, print_result, save
    from moeflow.checkpoint import load

    results = []
    for model in args.model:
        t = time.perf_counter()
        ck = load(model, device=args.device, dtype=args.dtype, progress=None)
        load_s = time.perf_counter() - t
        results.append(bench_generate(ck, args.prompt_len, args.new_tokens, args.runs) | {"load_s": load_s})
        print_result(results[-1])
        del ck
    if args.out:
        save(results, args.out)
    return 0


def cmd_train_demo(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    import torch

    from moeflow.train.demo import SIZES, train

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MoeflowError(f"--out {out} exists and is not a folder")
    overrides = {k: v for k in TRAIN_FLAGS if (v := getattr(args, k)) is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train(replace(SIZES[args.size], **overrides), Path(args.corpus), out, args.minutes, args.seed, device)
    return 0


TRAIN_FLAGS = {"epochs": float, "steps": int, "batch_size": int, "lr": float, "dropout": float, "aux_coef": float}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    g.add_argument("--model", help=f"checkpoint folder or synthetic:NAME (default: {DEFAULT_MODEL})")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=_SP["max_new_tokens"])
    g.add_argument("--temperature", type=float, default=_SP["temperature"], help="0 = greedy")
    g.add_argument("--top-p", type=float, default=_SP["top_p"])
    g.add_argument("--top-k", type=int, default=_SP["top_k"])
    g.add_argument("--seed", type=int, default=_SP["seed"])
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="always produce --max-new-tokens tokens")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, the checkpoint's on cpu), bf16, fp16, fp32")
    g.add_argument("--max-len", type=int, help="context length to reserve (default: prompt + new tokens)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bg = bsub.add_parser("generate", help="prefill and decode speed of one request, against the bound")
    bg.add_argument("--model", action="append", default=[], help="repeatable (default: the embedded default)")
    bg.add_argument("--device", default="cpu")
    bg.add_argument("--dtype", default="auto")
    bg.add_argument("--prompt-len", type=int, default=512)
    bg.add_argument("--new-tokens", type=int, default=128)
    bg.add_argument("--runs", type=int, default=3)
    bg.add_argument("--out", help="write the results as JSON here")
    bg.set_defaults(func=cmd_bench)

    s = sub.add_parser("synth", help="write random weights of a published shape as a Hugging Face folder")
    s.add_argument("name", help="mixtral-8x7b, qwen3-30b-a3b, tiny-mixtral or tiny-qwen3")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default="auto")
    s.set_defaults(func=cmd_synth)

    from moeflow.train.demo import SIZES
    t = sub.add_parser("train-demo", help="train the embedded demo model (a small Mixtral) on a text corpus")
    t.add_argument("--corpus", required=True, help="folder of .txt/.rst/.md files (e.g. the Python docs sources)")
    t.add_argument("--out", required=True, help="folder to write the Hugging Face checkpoint into")
    t.add_argument("--size", default="demo", choices=list(SIZES), help="demo (GPU, minutes), tiny (CPU), test")
    t.add_argument("--minutes", type=float, default=7.0, help="wall-clock limit on training; export follows")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cuda or cpu (default: cuda where available)")
    for name, typ in TRAIN_FLAGS.items():
        t.add_argument(f"--{name.replace('_', '-')}", type=typ,
                       help=f"default: {getattr(SIZES['demo'], name)} (--size demo)")
    t.set_defaults(func=cmd_train_demo)
    return p


def check_args(args) -> None:
    for name in ("max_new_tokens", "max_len"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise MoeflowError(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "temperature", 0) < 0 or not 0 < getattr(args, "top_p", 1) <= 1:
        raise MoeflowError("--temperature must be >= 0 and --top-p in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "bench", None) == "generate" and not args.model:
        args.model = [DEFAULT_MODEL]
    try:
        check_args(args)
        return args.func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
