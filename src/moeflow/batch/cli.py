"""`moeflow batch`: an OpenAI Batch API JSONL file through the engine, results appended to --output (resumable)."""

from __future__ import annotations

import argparse

import sys
from pathlib import Path

from moeflow import MoeflowError


def add_parser(subparsers) -> None:
    from moeflow.flags import device_flags, model_flag

    p = subparsers.add_parser("batch", help="run an OpenAI Batch API JSONL file offline (resumable)")
    model_flag(p)
    p.add_argument("--input", required=True, help="JSONL: Batch API lines (custom_id, method, url, body) or "
                   "{\"prompt\": ...} lines")
    p.add_argument("--output", required=True, help="results JSONL (Batch API format); an existing one is resumed: "
                   "custom_ids already in it are skipped")
    p.add_argument("--served-model-name", help="the `model` named in the responses (default: --model)")
    p.add_argument("--max-new-tokens", type=int, help="for requests without max_tokens (default: the API's: 16 "
                   "for completions, the rest of the context for chat)")
    # dest names of their own: `moeflow`'s shared checks expect numbers where these default to None
    p.add_argument("--temperature", type=float, dest="default_temperature",
                   help="for requests without one (default: the API's, 1.0)")
    p.add_argument("--top-p", type=float, dest="default_top_p", help="for requests without one (default 1.0)")
    p.add_argument("--seed", type=int, help="for requests without one")
    p.add_argument("--max-running", type=int, default=16, help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-len", type=int, help="prompt + generated tokens per request (default 4096; "
                   "1024 with the pipeline engine, whose host KV cache holds N runs of 512 + --max-new-tokens)")
    p.add_argument("--max-context", dest="max_len", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--engine", default="auto", choices=("auto", "continuous", "pipeline"),
                   help="continuous: the serving engine's continuous batching; pipeline: the throughput regime "
                   "(CPU attention, streamed experts, micro-batches); auto: pipeline with --gpu-memory on a GPU "
                   "(for dense experts; quantized ones stay on continuous until measured on a GPU host)")
    p.add_argument("--plan", help="pipeline plan N,mu,r_w,r_c,attn (default: chosen by the throughput model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    device_flags(p)
    p.set_defaults(func=run)


def read_requests(path: Path, done: set[str]) -> list:
    """The input's lines not yet in the output, as requests (BatchRequest) or as their error records."""
    from moeflow.batch.requests import BatchRequest, failed, parse_line

    if not path.is_file():
        raise MoeflowError(f"--input {path} does not exist" if not path.exists() else f"--input {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MoeflowError(f"--input {path} cannot be read: {e}") from None
    items, seen = [], set()
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        item = parse_line(text, n)
        cid = item.custom_id if isinstance(item, BatchRequest) else item["custom_id"]
        if cid is None:  # a line that names no request: its line number does (stable across reruns)
            item["custom_id"] = cid = f"line-{n}"
        if cid in seen:
            item = failed(f"line-{n}", "duplicate_custom_id", f"line {n}: custom_id {cid!r} is used by an earlier line")
            cid = item["custom_id"]
        seen.add(cid)
        if cid not in done:
            items.append(item)
    return items


def run(args) -> int:
    from tqdm import tqdm

    from moeflow.batch.job import BatchJob, Defaults
    from moeflow.batch.results import ResultFile
    from moeflow.flags import DEFAULT_MODEL

    for flag in ("max_running", "max_len"):
        if (getattr(args, flag) or 1) < 1:
            raise MoeflowError(f"--{flag.replace('_', '-')} must be at least 1")
    t, p = args.default_temperature, args.default_top_p
    if (t is not None and t < 0) or (p is not None and not 0 < p <= 1):
        raise MoeflowError("--temperature must be >= 0 and --top-p in (0, 1]")
    with ResultFile(args.output) as out:
        items = read_requests(Path(args.input), out.done)
        if out.dropped:
            print(f"moeflow: {args.output}: {out.dropped} torn or unreadable line(s) removed", file=sys.stderr)
        print(f"moeflow: {len(items)} request(s) to run, {len(out.done)} already in {args.output}", file=sys.stderr)
        if not items:
            return 0
        engine, pred = _engine(args)
        defaults = Defaults(args.max_new_tokens, args.default_temperature, args.default_top_p, args.seed)
        job = BatchJob(engine, args.served_model_name or args.model or DEFAULT_MODEL, defaults)
        bar = tqdm(total=len(items), unit="req", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)

        def emit(rec: dict) -> None:
            out.write(rec)
            bar.set_postfix_str(f"{job.stats.tokens_per_s:.1f} tok/s, {job.stats.errors} errors", refresh=False)
            bar.update(1)

        try:
            stats = job.run(items, emit)
        except KeyboardInterrupt:
            bar.close()
            print(f"moeflow: interrupted; {out.written} result(s) written to {args.output}: rerun the same command "
                  "to resume", file=sys.stderr)
            return 130
        bar.close()
    print(f"moeflow: {stats.ok} ok, {stats.errors} error(s) -> {args.output} | {stats.generated_tokens} tokens in "
          f"{stats.elapsed_s:.1f} s ({stats.tokens_per_s:.1f} tok/s"
          + (f"; the plan predicted {pred.tokens_per_s:.1f}" if pred else "") + ")", file=sys.stderr)
    return 0


def _engine(args):
    """(engine, the pipeline plan's prediction or None) as --engine asks."""
    import torch

    from moeflow.checkpoint import model_quant
    from moeflow.flags import DEFAULT_MODEL
    from moeflow.launch import load_engine

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    # quantized experts run on the pipeline when asked; auto keeps them on continuous until measured on a GPU host
    dense = model_quant(args.model or DEFAULT_MODEL, args.quantize) is None
    kind = args.engine if args.engine != "auto" else "pipeline" if args.gpu_memory and cuda and dense \
        else "continuous"
    if kind == "continuous":
        if args.plan:
            raise MoeflowError("--plan needs --engine pipeline")
        return load_engine(args, args.max_running), None
    from moeflow.config import parse_size
    from moeflow.pipeline.load import PipelineSpec, load_pipeline

    if args.policy not in (None, "auto") or args.placement or args.routing_trace:
        raise MoeflowError("--policy, --placement and --routing-trace belong to --engine continuous")
    max_len, gen_len = args.max_len or 1024, args.max_new_tokens or 128
    spec = PipelineSpec(args.model or DEFAULT_MODEL, "cuda" if cuda else "cpu", args.dtype,
                        parse_size(args.gpu_memory) if args.gpu_memory else None, args.plan,
                        prompt_len=max(1, min(512, max_len - gen_len)), gen_len=gen_len, max_len=max_len,
                        default_n=args.max_running, quant=args.quantize)
    return load_pipeline(spec)
