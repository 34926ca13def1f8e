"""`moeflow bench throughput`: the pipeline engine (throughput regime) on a batch of prompts per generation length,
against its plan's prediction, and the continuous-batching engine at the same GPU budget as the baseline.

Per row: end-to-end tok/s (generated tokens over the whole run, prefill included), decode tok/s, the plan and its
predicted tok/s, time shares (the CPU attention worker's busy time; PCIe: bytes copied over the profiled
bandwidth; one decode layer's wall time beside the plan's terms), peak GPU memory, and the host's: planned,
the engine's host tensors, and the process's peak resident set during the row.
With --out, each row is written as it finishes and a rerun skips the rows already there (split a long run
over several commands with --configs and --gen-lens).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from moeflow import MoeflowError
from moeflow.config import write_whole

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
    b.add_argument("--layers", type=int, help="synthetic models with this many decoder layers (a quick probe)")
    b.add_argument("--baseline-batches", default="8,32", help="continuous-batching engine's batch sizes "
                   "(the best is reported); empty: no baseline")
    b.add_argument("--baseline-tokens", type=int, default=32, help="tokens per request in the baseline")
    b.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="where the model runs")
    b.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on cuda, the checkpoint's own on cpu")
    b.add_argument("--out", help="JSON results, written after each row; rows already in it are skipped")
    b.set_defaults(func=run)


def _prompts(tokenizer, path: str | None) -> list[list[int]]:
    from moeflow.bench.prompts import read_prompts

    texts = read_prompts(path) if path else ["Explain how a CPU and a GPU can share the work of serving a model."]
    return [tokenizer.encode(t) for t in texts]


def _host_status(key: str) -> int:
    """A VmRSS/VmHWM-style field of this process in bytes (0 where /proc has none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current
    except OSError:
        pass


def _peaks(device: torch.device) -> dict:
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"peak_gpu_bytes": gpu, "peak_host_bytes": _host_status("VmHWM"), "host_rss_bytes": _host_status("VmRSS")}


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
    """One pipeline run of the prompts cycled to the plan's batch, planned with `profile`, beside its plan."""
    from moeflow.pipeline.engine import PipelineEngine
    from moeflow.pipeline.load import PipelineSpec, describe, kv_positions, plan_for

    prompt_len = -(-sum(map(len, prompts)) // len(prompts))
    spec = PipelineSpec(model, args.device, args.dtype, budget, args.plan, prompt_len, gen_len,
                        max(map(len, prompts)) + gen_len + 1, max_n=args.max_batch)
    pol, pred = plan_for(spec, held=ck.store.nbytes, cfg=ck.cfg, profile=profile)
    print(f"  gen {gen_len}: {describe(pred)}", file=sys.stderr)
    n = args.num_prompts or pol.N
    # the cycled requests' own runs, when their prompts are longer than the mean on the whole
    positions = max(kv_positions(spec, pol), sum(len(prompts[i % len(prompts)]) + gen_len for i in range(n)))
    _reset_peaks(torch.device(args.device))
    engine = PipelineEngine(ck, pol, spec.max_len, kv_positions=positions, gpu_memory=budget)
    try:
        elapsed, tokens = _drive(engine, prompts, n, gen_len)
        elapsed += engine.cache.touch_s  # the KV arenas are touched before the run: their time counts in it
        row = _pipeline_figures(engine, pred, elapsed, tokens, n, profile) | {
            "engine": "pipeline", "model": model, "gpu_memory": budget, "gen_len": gen_len, "requests": n,
            "prompt_len": prompt_len, "layers": _layers(model, args), "kv_positions": positions,
            "profile": profile.device_name, "profile_source": profile.source,
            "host_tensor_bytes": ck.store.nbytes + engine.cache.nbytes} | _peaks(engine.device)
    finally:
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"    {row['tokens_per_s']:.1f} tok/s end to end (predicted {pred.tokens_per_s:.1f}), decode "
          f"{row['decode_tps']:.1f} tok/s (predicted {pred.decode_tps:.1f}); decode layer {row['layer_ms']:.2f} ms "
          f"(plan {pred.layer_s * 1e3:.2f}: PCIe {pred.terms['PCIe'] * 1e3:.2f}, CPU "
          f"{pred.terms['CPU memory bus'] * 1e3:.2f}, GPU {pred.terms['GPU'] * 1e3:.2f}), CPU attention "
          f"{row['cpu_attention_ms']:.2f} ms/layer ({row['cpu_attention_gbps']:.1f} GB/s of K/V); "
          f"prefill {row['prefill_s']:.1f} s (plan {pred.prefill_s:.1f}; host KV arenas made in "
          f"{row['kv_touch_s']:.1f} s before it, K/V into them "
          f"{row['kv_store_s']:.1f} s, waited for {row['kv_wait_s']:.1f}); {row['decode_steps']} decode steps; "
          f"host planned {row['plan']['host_bytes'] / 2**30:.1f} GiB, tensors "
          f"{row['host_tensor_bytes'] / 2**30:.1f}, peak RSS {row['peak_host_bytes'] / 2**30:.1f}; GPU peak "
          f"{row['peak_gpu_bytes'] / 2**30:.1f} GiB (plan {pred.gpu_bytes / 2**30:.1f}); weights streamed at "
          f"{row['h2d_gbps']:.1f} GB/s (profile {profile.h2d_bw / 1e9:.1f})", file=sys.stderr)
    return row


def _pipeline_figures(engine, pred, elapsed: float, tokens: int, n: int, profile) -> dict:
    decode_tokens = tokens - n  # each request's first token comes from its prefill
    layers = engine.ck.cfg.num_hidden_layers * max(engine.decode_steps, 1)
    pcie = engine.weights.bytes_h2d / profile.h2d_bw
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "decode_tps": decode_tokens / max(engine.decode_s, 1e-9), "prefill_s": engine.prefill_s,
            "decode_s": engine.decode_s, "decode_steps": engine.decode_steps, "kv_touch_s": engine.cache.touch_s,
            "kv_store_s": engine.kv_store_s, "kv_wait_s": engine.kv_wait_s,
            "layer_ms": engine.decode_s / layers * 1e3, "cpu_attention_ms": engine.cpu_attention_s / layers * 1e3,
            "cpu_attention_gbps": engine.cpu_attention_bytes / max(engine.cpu_attention_s, 1e-9) / 1e9,
            "plan": pred.as_dict(), "predicted_tokens_per_s": pred.tokens_per_s,
            "shares": {"cpu_attention": engine.cpu_attention_s / elapsed, "pcie": pcie / elapsed,
                       "gpu_and_host_rest": max(0.0, 1 - (engine.cpu_attention_s + pcie) / elapsed)},
            "bytes_h2d": engine.weights.bytes_h2d,
            "h2d_gbps": engine.weights.bytes_h2d / max(engine.prefill_s + engine.decode_s, 1e-9) / 1e9}


def baseline_rows(ck, model: str, budget: int, prompts, args) -> list[dict]:
    """The continuous-batching engine, experts offloaded at the same budget, per batch size."""
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine

    rows = []
    for b in [int(x) for x in args.baseline_batches.split(",") if x]:
        max_len = max(map(len, prompts)) + args.baseline_tokens + 1
        _reset_peaks(torch.device(args.device))
        engine = LLMEngine(ck, max_seqs=b, max_len=max_len,
                           offload=OffloadConfig(budget) if args.device == "cuda" else None)
        try:
            elapsed, tokens = _drive(engine, prompts, b, args.baseline_tokens)
        except MoeflowError as e:
            rows.append({"engine": "continuous", "model": model, "gpu_memory": budget, "batch": b,
                         "layers": _layers(model, args), "error": str(e)})
            continue
        finally:
            engine.close()
            del engine
            gc.collect()
        rows.append({"engine": "continuous", "model": model, "gpu_memory": budget, "batch": b,
                     "layers": _layers(model, args), "gen_len": args.baseline_tokens, "tokens": tokens,
                     "seconds": elapsed, "tokens_per_s": tokens / elapsed} | _peaks(torch.device(args.device)))
        print(f"  continuous batching, batch {b}: {tokens / elapsed:.1f} tok/s", file=sys.stderr)
    return rows


def _key(row: dict) -> tuple:
    return (row["engine"], row["model"], row.get("gpu_memory"), row.get("gen_len") if row["engine"] == "pipeline"
            else row.get("batch"), row.get("layers"))


class Results:
    """The rows so far, read from --out (a rerun resumes) and written back after each new row."""

    def __init__(self, path: str | None, device: str):
        self.path = Path(path) if path else None
        self.data = {"device": device, "rows": []}
        if self.path is not None and self.path.is_file():
            try:
                self.data["rows"] = json.loads(self.path.read_text())["rows"]
            except (ValueError, KeyError, TypeError):
                raise MoeflowError(f"--out {self.path} holds no results of this benchmark") from None

    def has(self, key: tuple) -> bool:
        return any(_key(r) == key for r in self.data["rows"])

    def add(self, rows: list[dict]) -> None:
        self.data["rows"] += rows
        if self.path is not None:
            write_whole(self.path, json.dumps(self.data, indent=1))


def _layers(model: str, args) -> int | None:
    return args.layers if model.startswith("synthetic:") else None


def _load(model: str, args):
    from moeflow.checkpoint import load

    if args.layers and model.startswith("synthetic:"):
        from moeflow.checkpoint import synthetic_quant
        from moeflow.synthetic import build_synthetic

        name, quant = synthetic_quant(model.removeprefix("synthetic:"))  # an -int4 / -int8 preset too
        return build_synthetic(name, args.device, None if args.dtype == "auto" else args.dtype, "cpu",
                               overrides={"num_hidden_layers": args.layers}, quant=quant)
    return load(model, device=args.device, dtype=args.dtype, expert_device="cpu", progress=None)


def host_profile(ck, device: str):
    """The plan's hardware profile: on a GPU this host's, measured for the model's shape once and cached (the
    plan is then this run's own, not the reference host's); on the CPU the cached or reference one."""
    from moeflow.pipeline.plan import machine_profile

    if device != "cuda":
        return machine_profile()
    from moeflow.perf.measure import checkpoint_profile

    return checkpoint_profile(ck)


def run(args) -> int:
    from moeflow.config import parse_size

    gen_lens = [int(g) for g in args.gen_lens.split(",")]
    configs = [c.rsplit("@", 1) for c in args.configs.split(",")]
    if any(len(c) != 2 for c in configs) or min(gen_lens) < 1:
        raise MoeflowError("--configs takes MODEL@BUDGET items and --gen-lens positive lengths")
    results = Results(args.out, torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    baselines = [int(x) for x in args.baseline_batches.split(",") if x]
    for model, budget_text in configs:
        budget, layers = parse_size(budget_text), _layers(model, args)
        todo = [g for g in gen_lens if not results.has(("pipeline", model, budget, g, layers))]
        base = [b for b in baselines if not results.has(("continuous", model, budget, b, None))]
        if not todo and not base:
            continue
        print(f"{model} at {budget_text}:", file=sys.stderr)
        ck = _load(model, args)
        if ck.store.data.device.type == "cpu" and args.device == "cuda":
            ck.store.pin()
        prompts = _prompts(ck.tokenizer, args.prompts)
        profile = host_profile(ck, args.device)  # each row names the profile it was planned with
        for g in todo:
            results.add([pipeline_row(ck, model, budget, prompts, g, args, profile)])
        if base:
            args.baseline_batches = ",".join(map(str, base))
            results.add(baseline_rows(ck, model, budget, prompts, args))
        del ck
        gc.collect()
    return 0
