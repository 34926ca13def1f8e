"""The `moeflow` command: generate | chat | serve | profile | plan | profile-experts | synth | train-demo | bench."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from moeflow import MoeflowError, __version__
from moeflow.engine.budget import gib as _gib
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.commands import cmd_bench_accuracy, cmd_plan, cmd_profile

DEFAULT_MODEL = "builtin:pydoc-moe"  # the embedded default: a small Mixtral trained on the Python docs, shipped
DEFAULT_PROMPT = "The :mod:`json` module"  # the embedded default continues Python documentation
_SP = {f.name: f.default for f in fields(SamplingParams)}


def cmd_generate(args) -> int:
    from moeflow.engine.llm_engine import LLMEngine, encode_prompt

    offload = _offload_config(args)
    ck = _load_checkpoint(args, args.device, offload)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    n_prompt = len(encode_prompt(ck.tokenizer, prompt))
    engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len or max(n_prompt + args.max_new_tokens + 1, 256),
                       offload=offload)
    last = None
    for last in engine.stream(prompt, params):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{ck.name} on {engine.device.type} | prompt {last.prompt_tokens} tok | "
          f"prefill {last.prefill_tps:.1f} tok/s | decode {last.decode_tps:.1f} tok/s "
          f"({last.generation_tokens} tok, {last.finish_reason}) | TTFT {last.ttft_s * 1000:.0f} ms | "
          f"peak {'GPU' if engine.device.type == 'cuda' else 'host'} memory {_gib(last.peak_memory)}"
          + (_expert_figures(last.experts, last.generation_tokens) if last.experts else "") + "]", file=sys.stderr)
    return 0


def _offload_config(args):
    from moeflow.config import OffloadConfig, parse_size

    if args.gpu_memory is None:
        for flag in ("policy", "placement", "routing_trace"):
            if getattr(args, flag) not in (None, "auto"):
                raise MoeflowError(f"--{flag.replace('_', '-')} needs --gpu-memory (the offloading engine)")
        return None
    return OffloadConfig(parse_size(args.gpu_memory), args.policy, args.placement, args.routing_trace,
                         expert_maps=getattr(args, "expert_maps", None))


def _load_checkpoint(args, device, offload):
    """--model (default: the embedded one) on `device`; its experts in host memory when offloading."""
    from moeflow.checkpoint import load

    ck = load(args.model or DEFAULT_MODEL, device=device, dtype=args.dtype, progress=None,
              expert_device="cpu" if offload else None)
    if ck.synthetic:
        print(f"moeflow: {ck.name} has random weights: expect gibberish", file=sys.stderr)
    return ck


def _expert_figures(e: dict, tokens: int) -> str:
    return (f" | experts: hit rate {e['hit_rate']:.0%}, CPU {e['cpu_experts'] / max(e['lookups'], 1):.0%}, "
            f"copied {e['copied_experts'] / max(e['lookups'], 1):.0%}, {e['bytes_h2d'] / 2**30:.2f} GiB to the GPU")


def _load_engine(args, max_seqs: int, max_len: int):
    """The engine of `serve` and `chat`: the model on --device (cuda where available), offloaded with --gpu-memory."""
    import torch

    from moeflow.engine.llm_engine import LLMEngine

    offload = _offload_config(args)
    ck = _load_checkpoint(args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), offload)
    return LLMEngine(ck, max_seqs=max_seqs, max_len=min(max_len, ck.cfg.max_position_embeddings), offload=offload)


def cmd_serve(args) -> int:
    from moeflow.server import run_server

    for flag in ("max_running", "max_context", "port"):
        if getattr(args, flag) < 1:
            raise MoeflowError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise MoeflowError("--max-queue must be at least 0")
    name = args.served_model_name or args.model or DEFAULT_MODEL
    return run_server(lambda: _load_engine(args, args.max_running, args.max_context), name, args.host, args.port,
                      args.max_queue, args.log_level)


def cmd_chat(args) -> int:
    from moeflow.chat import ChatSession, chat_loop

    engine = _load_engine(args, 1, args.max_context)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    if params.max_new_tokens >= engine.max_len:
        raise MoeflowError(f"--max-new-tokens must be below the context ({engine.max_len})")
    return chat_loop(ChatSession(engine, params, args.system))


def cmd_bench_serve(args) -> int:
    from moeflow.bench.serve import main as bench_serve

    return bench_serve(args)


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


def cmd_profile_experts(args) -> int:
    from moeflow.policy.placement import Placement

    if bool(args.prompts) == bool(args.trace):
        raise MoeflowError("give one of --prompts FILE or --trace FILE")
    if args.trace:
        from moeflow.checkpoint import read_model_config
        from moeflow.experts.trace import load_trace

        name, cfg = read_model_config(args.model or DEFAULT_MODEL)
        trace = load_trace(args.trace)
        trace.check(cfg)
        placement = Placement(name, trace.counts(cfg.num_experts))
    else:
        from moeflow.bench.prompts import read_prompts
        from moeflow.checkpoint import load
        from moeflow.engine.llm_engine import LLMEngine
        from moeflow.policy.placement import RoutingRecorder

        ck = load(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
        recorder = RoutingRecorder(ck.model.experts, ck.cfg)
        ck.model.set_experts(recorder)
        engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len, cuda_graphs=False)
        for p in tqdm(read_prompts(args.prompts), desc="profiling", unit="prompt"):
            ids = engine.encode([{"role": "user", "content": p}])[: args.max_len - args.max_new_tokens - 1]
            list(engine.stream(ids, SamplingParams(max_new_tokens=args.max_new_tokens)))
        placement = Placement(ck.name, recorder.counts)
    placement.save(args.out)
    top = placement.counts.sum(1, keepdim=True)
    share = float((placement.counts.sort(1, descending=True).values[:, :1] / top.clamp(min=1)).mean())
    print(f"wrote {args.out}: {int(placement.counts.sum())} selections over {placement.counts.shape[0]} MoE layers; "
          f"the most used expert of a layer takes {share:.0%} of its selections on average")
    return 0


def cmd_bench_latency(args) -> int:
    from dataclasses import asdict

    from moeflow.bench.accuracy import predict_row
    from moeflow.bench.latency import accelerate_baseline, ceilings, print_rows, run_policy, save
    from moeflow.bench.prompts import read_prompts
    from moeflow.checkpoint import load, resolve_device
    from moeflow.config import OffloadConfig, parse_size
    from moeflow.engine.llm_engine import encode_prompt
    from moeflow.perf.costs import ExpertCosts

    if args.runs < 1 or args.repeat < 1:
        raise MoeflowError(f"--runs and --repeat must be at least 1 (got {args.runs} and {args.repeat})")
    device = resolve_device(args.device)
    t = time.perf_counter()
    ck = load(args.model, device=device, dtype=args.dtype, expert_device="cpu", progress=True)
    load_s, t = time.perf_counter() - t, time.perf_counter()
    ck.store.pin()
    pin_s = time.perf_counter() - t
    ceil = ceilings(device)
    profile = None
    if args.profile:  # the timing model's predictions go beside each measurement
        from moeflow.perf.profile import HardwareProfile

        profile = HardwareProfile.load(args.profile)
    elif device.type == "cuda":
        from moeflow.perf.profile import get_profile

        profile = get_profile(ck.cfg, "cuda", dtype_name=str(ck.store.data.dtype).removeprefix("torch."))[0]
    print(f"{ck.name}: built/loaded in {load_s:.1f} s, pinned in {pin_s:.1f} s; CPU read "
          f"{ceil['cpu_read_bw'] / 1e9:.0f} GB/s, host->device {ceil['h2d_bw'] / 1e9:.0f} GB/s, "
          f"device memory {ceil['gpu_bw'] / 1e9:.0f} GB/s", flush=True)
    if "h2d_bw_concurrent" in ceil:
        print(f"both at once: CPU read {ceil['cpu_read_bw_concurrent'] / 1e9:.0f} GB/s + host->device "
              f"{ceil['h2d_bw_concurrent'] / 1e9:.0f} GB/s", flush=True)
    texts = read_prompts(args.prompts) if args.prompts else [DEFAULT_PROMPT]
    prompts = [encode_prompt(ck.tokenizer, [{"role": "user", "content": texts[i % len(texts)]}])
               for i in range(args.runs)]
    long = [t for p in texts for t in encode_prompt(ck.tokenizer, p)]
    ttft_prompt = (long * (args.ttft_len // max(len(long), 1) + 1))[: args.ttft_len]
    meta = {"model": ck.name, "device": torch_device_name(device), "load_s": load_s, "pin_s": pin_s,
            "ceilings": ceil, "new_tokens": args.new_tokens, "runs": args.runs, "repeat": args.repeat,
            "prompt_tokens": [len(p) for p in prompts],
            "date": time.strftime("%Y-%m-%d %H:%M")}
    if profile is not None:  # what the predictions came from: `bench model-accuracy --repredict` reuses it
        meta["profile"] = asdict(profile)
    dtype = str(ck.store.data.dtype).removeprefix("torch.")
    rows, costs, probe = [], None, None
    if profile is not None:  # the host's speed beside each row, against the profile's reading
        from moeflow.perf.probe import SpeedProbe

        probe = SpeedProbe(device)
        probe()  # its engine made before the rows
    print_rows([], header=True)
    # --repeat: every row again, in the same order, so that a slow spell of a shared host falls on one
    # repetition of each configuration rather than on all of one (model-accuracy takes the medians)
    for rep in range(args.repeat):
        for budget in [parse_size(b) for b in args.budgets.split(",")]:
            for trace in [None] + args.routing_trace:
                for policy in args.policies.split(","):
                    oc = OffloadConfig(budget, policy, args.placement if trace is None else args.trace_placement,
                                       trace)
                    try:
                        r = run_policy(ck, oc, prompts, ttft_prompt, args.new_tokens, ceil, costs, probe)
                        if profile is not None:
                            r |= predict_row(r, ck.cfg, profile, ck.name, args.new_tokens, dtype_name=dtype)
                    except Exception as e:  # a failed row is recorded; the others still run (device time is scarce)
                        msg = str(e) if isinstance(e, MoeflowError) else f"{type(e).__name__}: {e}"
                        if not isinstance(e, MoeflowError):
                            traceback.print_exc()
                        r = {"policy": policy, "gpu_memory_gib": budget / 2**30, "routing": trace or "native",
                             "error": msg}
                        print(f"{policy} at {budget / 2**30:.0f} GiB: {msg}", flush=True)
                    if costs is None and r.get("costs"):
                        costs = ExpertCosts.from_dict(r["costs"])
                    rows.append(r | {"repeat": rep})
                    if "error" not in r:
                        print_rows([r])
                    if args.out:  # each row as it lands: a run cut short keeps what it measured
                        save(meta, rows, args.out)
            if args.baseline_tokens and device.type == "cuda" and rep == 0:
                try:
                    rows.append(accelerate_baseline(ck, budget, prompts[0], args.baseline_tokens))
                    print_rows([rows[-1]])
                except Exception as e:  # the baseline is someone else's code: record its failure, keep going
                    rows.append({"policy": "transformers+accelerate", "gpu_memory_gib": budget / 2**30,
                                 "error": f"{type(e).__name__}: {e}"})
                    print(f"transformers+accelerate failed: {e}", flush=True)
    if probe is not None:
        probe.close()
    if args.out:
        save(meta, rows, args.out)
    return 0


def cmd_bench_cpu_experts(args) -> int:
    from moeflow.bench.cpu_experts import SHAPES, bench_cpu_experts, plot, save

    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise MoeflowError(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    result = bench_cpu_experts(shapes, [int(t) for t in args.tokens.split(",")], args.reps, args.threads,
                               args.kernel, args.torch_max_tokens)
    if args.out:
        save(result, args.out)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


def torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _add_offload_flags(g) -> None:
    from moeflow.policy import POLICIES

    g.add_argument("--gpu-memory", help="cap on GPU memory, e.g. 24GiB: experts stay in host memory and run on "
                   "the CPU or are copied in as the policy decides")
    g.add_argument("--policy", default="auto", choices=sorted(POLICIES), help="offloading policy (default auto)")
    g.add_argument("--placement", help="resident experts from `moeflow profile-experts` (default: even split)")
    g.add_argument("--routing-trace", help="benchmarks: replay a recorded routing instead of the router's")
    g.add_argument("--expert-maps", help="policy fmoe: expert-map file to start from (`moeflow maps build`)")


def _add_device_flags(g) -> None:
    g.add_argument("--device", help="cpu or cuda (default: cuda where available)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, the checkpoint's on cpu), bf16, fp16, fp32")
    _add_offload_flags(g)


def cmd_train_demo(args) -> int:
    from dataclasses import replace

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
    g.add_argument("--model", help=f"checkpoint folder, builtin:NAME or synthetic:NAME (default: {DEFAULT_MODEL})")
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
    _add_offload_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the terminal (streamed; /reset, /exit)")
    c.add_argument("--model", help=f"checkpoint folder, builtin:NAME or synthetic:NAME (default: {DEFAULT_MODEL})")
    c.add_argument("--system", help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=_SP["top_k"])
    c.add_argument("--seed", type=int, default=_SP["seed"])
    c.add_argument("--max-context", type=int, default=4096, help="tokens of conversation kept (oldest turns drop)")
    _add_device_flags(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, streaming, metrics)")
    sv.add_argument("--model", help=f"checkpoint folder, builtin:NAME or synthetic:NAME (default: {DEFAULT_MODEL})")
    sv.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-running", type=int, default=8, help="sequences decoded together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429")
    sv.add_argument("--max-context", type=int, default=4096, help="prompt + generated tokens per request")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_device_flags(sv)
    sv.set_defaults(func=cmd_serve)

    pe = sub.add_parser("profile-experts", help="count how often each expert is used, for --placement")
    pe.add_argument("--model", help=f"checkpoint folder, builtin:NAME or synthetic:NAME (default: {DEFAULT_MODEL})")
    pe.add_argument("--prompts", help="prompt file (JSONL with turns/text/prompt, or one prompt per line)")
    pe.add_argument("--trace", help="a recorded routing trace instead of prompts")
    pe.add_argument("--out", required=True, help="placement JSON to write")
    pe.add_argument("--max-new-tokens", type=int, default=32)
    pe.add_argument("--max-len", type=int, default=1024)
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--dtype", default="auto")
    pe.set_defaults(func=cmd_profile_experts)

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

    bl = bsub.add_parser("latency", help="one request, experts offloaded: every policy against the bound")
    bl.add_argument("--model", default="synthetic:mixtral-8x7b")
    bl.add_argument("--device", default="cuda")
    bl.add_argument("--dtype", default="auto")
    bl.add_argument("--budgets", default="24GiB,76GiB", help="comma-separated GPU budgets")
    bl.add_argument("--policies", default="auto,fiddler,lru")
    bl.add_argument("--prompts", help="prompt file: the first --runs prompts are decoded in turn, all of them fill "
                    "the TTFT prompt")
    bl.add_argument("--new-tokens", type=int, default=128)
    bl.add_argument("--runs", type=int, default=1, help="decode runs per configuration (median reported)")
    bl.add_argument("--repeat", type=int, default=1, help="all rows this many times over, in turn (model-accuracy "
                    "compares the medians per configuration)")
    bl.add_argument("--ttft-len", type=int, default=512, help="prompt length of the TTFT measurement")
    bl.add_argument("--routing-trace", action="append", default=[], help="also replay this trace (repeatable)")
    bl.add_argument("--placement", help="placement for native routing")
    bl.add_argument("--trace-placement", help="placement for the trace runs")
    bl.add_argument("--baseline-tokens", type=int, default=0,
                    help="also run transformers + accelerate for this many new tokens (GPU only; 0 = skip)")
    bl.add_argument("--profile", help="hardware profile JSON the predictions start from (default on a GPU: this "
                    "machine's cached one, measured if missing; on a CPU: none, no predictions)")
    bl.add_argument("--out", help="write the results as JSON here")
    bl.set_defaults(func=cmd_bench_latency)

    pr = sub.add_parser("profile", help="measure this machine once (cached): bandwidths, expert times, links")
    pr.add_argument("--model", default="synthetic:mixtral-8x7b", help="whose expert shape to time")
    pr.add_argument("--device", default="cuda", help="cuda (the CPU side only where no GPU is visible) or cpu")
    pr.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    pr.add_argument("--out", help="also write the profile JSON here")
    pr.add_argument("--quick", action="store_true", help="tiny sizes (tests, smoke runs): rough figures")
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="predict each policy's speed from the hardware profile; choose a plan")
    pl.add_argument("--model", default="synthetic:mixtral-8x7b", help="folder, builtin:NAME or synthetic:NAME "
                    "(only its config is read)")
    pl.add_argument("--gpu-memory", required=True, help="GPU budget, e.g. 24GiB")
    pl.add_argument("--workload", default="both", choices=("latency", "throughput", "both"))
    pl.add_argument("--prompt-len", type=int, default=512)
    pl.add_argument("--gen-len", type=int, default=128)
    pl.add_argument("--profile", help="hardware profile JSON (default: this machine's, else the built-in reference)")
    pl.add_argument("--placement", help="expert popularity from `moeflow profile-experts` (default: uniform)")
    pl.add_argument("--hit-rate", type=float, help="assume this decode hit rate instead of deriving it")
    pl.add_argument("--host-memory", help="host memory the throughput plan may use (default: 90%% of the profile's)")
    pl.add_argument("--roofline", help="write the hierarchical roofline PNG here")
    pl.set_defaults(func=cmd_plan)

    ba = bsub.add_parser("model-accuracy", help="the timing model's predictions against a `bench latency` JSON")
    ba.add_argument("--results", required=True, help="JSON written by `moeflow bench latency --out`")
    ba.add_argument("--plot", help="write the predicted-vs-measured PNG here")
    ba.add_argument("--out", help="write the compared rows as JSON here")
    ba.add_argument("--model", help="model whose config to use (default: the one the results name)")
    ba.add_argument("--repredict", action="store_true",
                    help="predict every row again with this moeflow's timing model (from the run's own hardware "
                         "profile where the results hold one), instead of comparing the predictions stored in it")
    ba.add_argument("--profile", help="hardware profile for rows without predictions (default: this machine's, "
                    "else the built-in reference)")
    ba.set_defaults(func=cmd_bench_accuracy)

    bs = bsub.add_parser("serve", help="drive a running server with ShareGPT prompts (TTFT, TPOT, ITL, throughput)")
    from moeflow.bench.serve import add_flags
    add_flags(bs)
    bs.set_defaults(func=cmd_bench_serve)

    bc = bsub.add_parser("cpu-experts", help="a layer's experts on the CPU: native kernel and PyTorch against "
                         "the memory-read ceiling")
    bc.add_argument("--shapes", default="mixtral,qwen3", help="comma-separated: mixtral, qwen3")
    bc.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256", help="tokens per expert, comma-separated")
    bc.add_argument("--reps", type=int, default=10)
    bc.add_argument("--threads", type=int, help="kernel (and PyTorch) threads (default: the physical cores)")
    bc.add_argument("--kernel", default=None, help="native path (default: MOEFLOW_CPU_KERNEL or auto)")
    bc.add_argument("--torch-max-tokens", type=int, default=256, help="skip PyTorch above this many tokens")
    bc.add_argument("--out", help="write the results as JSON here")
    bc.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    bc.set_defaults(func=cmd_bench_cpu_experts)

    from moeflow.bench import cache as bench_cache
    from moeflow.maps import commands as maps_commands
    bench_cache.add_parser(bsub)
    maps_commands.add_parser(sub)
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
    for name in ("max_new_tokens", "max_len", "max_context", "max_running", "num_prompts", "max_tokens"):
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
