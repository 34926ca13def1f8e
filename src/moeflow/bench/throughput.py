"""`moeflow bench throughput`: the pipeline engine (throughput regime) on a batch of prompts per generation length,
against its plan's prediction, and the continuous-batching engine at the same GPU budget as the baseline.

Per row: end-to-end tok/s (generated tokens over the whole run, prefill included), decode tok/s, the plan and its
predicted tok/s, time shares (the CPU attention worker's busy time; PCIe: bytes copied over the profiled
bandwidth; the GPU and the host's own work: the rest), peak GPU and host memory.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

from moeflow import MoeflowError

CONFIGS = "synthetic:mixtral-8x7b@24GiB,synthetic:qwen3-30b-a3b@16GiB"


def add_parser(bsub) -> None:
    b = bsub.add_parser("throughput", help="the pipeline engine on a batch of prompts against its plan, and the "
                        "continuous-batching engine at the same budget")
    b.add_argument("--configs", default=CONFIGS, help=f"comma-separated MODEL@BUDGET (default {CONFIGS})")
    b.add_argument("--prompts", help="prompt file (MT-Bench JSONL: the first turns; default: a built-in prompt)")
    b.add_argument("--gen-lens", default="32,64,128,256", help="generation lengths, comma-separated")
    b.add_argument("--num-prompts", type=int, help="requests per row (default: the plan's N, prompts cycled)")
    b.add_argument("--max-batch", type=int, help="the chosen plans' N at most (default: what memory allows)")
    b.add_argument("--plan", help="N,mu,r_w,r_c,attn for every row (default: chosen per row by the model)")
    b.add_argument("--baseline-batches", default="8,32", help="continuous-batching engine's batch sizes "
                   "(the best is reported); empty: no baseline")
    b.add_argument("--baseline-tokens", type=int, default=32, help="tokens per request in the baseline")
    b.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="where the model runs")
    b.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on cuda, the checkpoint's own on cpu")
    b.add_argument("--out", help="write the results as JSON here")
    b.set_defaults(func=run)


def _prompts(tokenizer, path: str | None) -> list[list[int]]:
    from moeflow.bench.prompts import read_prompts

    texts = read_prompts(path) if path else ["Explain how a CPU and a GPU can share the work of serving a model."]
    return [tokenizer.encode(t) for t in texts]


def _peaks(device: torch.device) -> dict:
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"peak_gpu_bytes": gpu, "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _drive(engine, prompts: list[list[int]], n: int, gen_len: int) -> tuple[float, int]:
    """n requests of gen_len tokens (EOS ignored) through engine; (seconds, tokens generated)."""
    from moeflow.engine.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=gen_len, ignore_eos=True)
    seqs = [engine.add_request(prompts[i % len(prompts)], params) for i in range(n)]
    t = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - t, sum(len(s.output_ids) for s in seqs)


def pipeline_row(ck, model: str, budget: int, prompts, gen_len: int, args, profile) -> dict:
    from moeflow.pipeline.engine import PipelineEngine
    from moeflow.pipeline.load import PipelineSpec, describe, plan_for

    prompt_len = round(sum(map(len, prompts)) / len(prompts))
    spec = PipelineSpec(model, args.device, args.dtype, budget, args.plan, prompt_len, gen_len,
                        max(map(len, prompts)) + gen_len + 1, max_n=args.max_batch)
    pol, pred = plan_for(spec)
    print(f"  gen {gen_len}: {describe(pred)}", file=sys.stderr)
    n = args.num_prompts or pol.N
    engine = PipelineEngine(ck, pol, spec.max_len)
    try:
        elapsed, tokens = _drive(engine, prompts, n, gen_len)
        decode_tokens = tokens - n  # each request's first token comes from its prefill
        pcie = engine.weights.bytes_h2d / profile.h2d_bw
        row = {"engine": "pipeline", "model": model, "gpu_memory": budget, "gen_len": gen_len, "requests": n,
               "prompt_len": prompt_len, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
               "decode_tps": decode_tokens / max(engine.decode_s, 1e-9), "prefill_s": engine.prefill_s,
               "plan": pred.as_dict(), "predicted_tokens_per_s": pred.tokens_per_s,
               "shares": {"cpu_attention": engine.cpu_attention_s / elapsed, "pcie": pcie / elapsed,
                          "gpu_and_host_rest": max(0.0, 1 - (engine.cpu_attention_s + pcie) / elapsed)},
               "bytes_h2d": engine.weights.bytes_h2d} | _peaks(engine.device)
    finally:
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"    {row['tokens_per_s']:.1f} tok/s end to end (predicted {pred.tokens_per_s:.1f}), decode "
          f"{row['decode_tps']:.1f} tok/s", file=sys.stderr)
    return row


def baseline_rows(ck, model: str, budget: int, prompts, args) -> list[dict]:
    """The continuous-batching engine, experts offloaded at the same budget, per batch size."""
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine

    rows = []
    for b in [int(x) for x in args.baseline_batches.split(",") if x]:
        max_len = max(map(len, prompts)) + args.baseline_tokens + 1
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        engine = LLMEngine(ck, max_seqs=b, max_len=max_len,
                           offload=OffloadConfig(budget) if args.device == "cuda" else None)
        try:
            elapsed, tokens = _drive(engine, prompts, b, args.baseline_tokens)
        except MoeflowError as e:
            rows.append({"engine": "continuous", "model": model, "batch": b, "error": str(e)})
            continue
        finally:
            del engine
            gc.collect()
        rows.append({"engine": "continuous", "model": model, "gpu_memory": budget, "batch": b,
                     "gen_len": args.baseline_tokens, "tokens": tokens, "seconds": elapsed,
                     "tokens_per_s": tokens / elapsed} | _peaks(torch.device(args.device)))
        print(f"  continuous batching, batch {b}: {tokens / elapsed:.1f} tok/s", file=sys.stderr)
    return rows


def run(args) -> int:
    from moeflow.checkpoint import load
    from moeflow.config import parse_size
    from moeflow.pipeline.plan import machine_profile

    gen_lens = [int(g) for g in args.gen_lens.split(",")]
    configs = [c.rsplit("@", 1) for c in args.configs.split(",")]
    if any(len(c) != 2 for c in configs) or min(gen_lens) < 1:
        raise MoeflowError("--configs takes MODEL@BUDGET items and --gen-lens positive lengths")
    profile, results = machine_profile(), []
    for model, budget_text in configs:
        budget = parse_size(budget_text)
        print(f"{model} at {budget_text}:", file=sys.stderr)
        ck = load(model, device=args.device, dtype=args.dtype, expert_device="cpu", progress=None)
        if ck.store.data.device.type == "cpu" and args.device == "cuda":
            ck.store.pin()
        prompts = _prompts(ck.tokenizer, args.prompts)
        for g in gen_lens:
            results.append(pipeline_row(ck, model, budget, prompts, g, args, profile))
        results += baseline_rows(ck, model, budget, prompts, args)
        del ck
        gc.collect()
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "profile": profile.device_name, "rows": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0
