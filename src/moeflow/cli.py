"""The `moeflow` command: generate | chat | serve | profile | plan | profile-experts | synth | train-demo | bench."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from moeflow import MoeflowError, __version__
from moeflow.engine.budget import gib as _gib
from moeflow.config import EngineConfig
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.commands import cmd_bench_accuracy, cmd_plan, cmd_profile

DEFAULT_MODEL = EngineConfig.model  # the embedded default: a small Mixtral trained on the Python docs, shipped
DEFAULT_PROMPT = "The :mod:`json` module"  # the embedded default continues Python documentation
_SP = {f.name: f.default for f in fields(SamplingParams)}


def cmd_generate(args) -> int:
    from moeflow.engine.llm_engine import LLMEngine, encode_prompt
    from moeflow.perf.profile import engine_costs

    offload = _offload_config(args)
    ck = _load_checkpoint(args, args.device or ENGINE.resolved_device(), offload)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    n_prompt = len(encode_prompt(ck.tokenizer, prompt))
    check_context(args, ck.cfg.max_position_embeddings, n_prompt)
    engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len or max(n_prompt + args.max_new_tokens + 1, 256),
                       offload=offload, expert_costs=engine_costs(ck, offload), deterministic=args.deterministic)
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
        for flag in ("policy", "placement", "routing_trace", "expert_maps"):
            if getattr(args, flag) not in (None, "auto"):
                raise MoeflowError(f"--{flag.replace('_', '-')} needs --gpu-memory (the offloading engine)")
        return None
    return OffloadConfig(parse_size(args.gpu_memory), args.policy, args.placement, args.routing_trace,
                         expert_maps=args.expert_maps)


def _load_checkpoint(args, device, offload):
    """--model (default: the embedded one) on `device`; its experts in host memory when offloading."""
    from moeflow.checkpoint import load, read_model_config

    check_context(args, read_model_config(args.model or DEFAULT_MODEL)[1].max_position_embeddings)
    ck = load(args.model or DEFAULT_MODEL, device=device, dtype=args.dtype, progress=None,
              expert_device="cpu" if offload else None, quant=args.quantize)
    if ck.synthetic:
        print(f"moeflow: {ck.name} has random weights: expect gibberish", file=sys.stderr)
    return ck


def _expert_figures(e: dict, tokens: int) -> str:
    return (f" | experts: hit rate {e['hit_rate']:.0%}, CPU {e['cpu_experts'] / max(e['lookups'], 1):.0%}, "
            f"copied {e['copied_experts'] / max(e['lookups'], 1):.0%}, {e['bytes_h2d'] / 2**30:.2f} GiB to the GPU")


def _load_engine(args, max_seqs: int):
    """The engine of `serve` and `chat`: the model on --device (cuda where available), offloaded with --gpu-memory."""
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.perf.profile import engine_costs

    offload = _offload_config(args)
    ck = _load_checkpoint(args, args.device or ENGINE.resolved_device(), offload)
    return LLMEngine(ck, max_seqs=max_seqs, max_len=args.max_len, offload=offload,
                     expert_costs=engine_costs(ck, offload), deterministic=args.deterministic)


def cmd_serve(args) -> int:
    from moeflow.server import run_server

    if args.max_queue < 0:
        raise MoeflowError("--max-queue must be at least 0")
    name = args.served_model_name or args.model or DEFAULT_MODEL
    return run_server(lambda: _load_engine(args, args.max_running), name, args.host, args.port,
                      args.max_queue, args.log_level)


def cmd_chat(args) -> int:
    from moeflow.chat import ChatSession, chat_loop

    engine = _load_engine(args, 1)
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
        ck = load(model, device=args.device or ENGINE.resolved_device(), dtype=args.dtype, progress=None)
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

        ck = load(args.model or DEFAULT_MODEL, device=args.device or ENGINE.resolved_device(), dtype=args.dtype)
        recorder = RoutingRecorder(ck.model.experts, ck.cfg)
        ck.model.set_experts(recorder)
        engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len, cuda_graphs=False)
        if args.max_new_tokens >= engine.max_len:
            raise MoeflowError(f"--max-new-tokens must be below the context ({engine.max_len})")
        for p in tqdm(read_prompts(args.prompts), desc="profiling", unit="prompt"):
            ids = engine.encode([{"role": "user", "content": p}])[: engine.max_len - args.max_new_tokens - 1]
            list(engine.stream(ids, SamplingParams(max_new_tokens=args.max_new_tokens)))
        placement = Placement(ck.name, recorder.counts)
    placement.save(args.out)
    top = placement.counts.sum(1, keepdim=True)
    share = float((placement.counts.sort(1, descending=True).values[:, :1] / top.clamp(min=1)).mean())
    print(f"wrote {args.out}: {int(placement.counts.sum())} selections over {placement.counts.shape[0]} MoE layers; "
          f"the most used expert of a layer takes {share:.0%} of its selections on average")
    return 0


def cmd_bench_latency(args) -> int:
    from moeflow.bench.latency import main as bench_latency

    return bench_latency(args, DEFAULT_PROMPT)


def cmd_bench_cpu_experts(args) -> int:
    from moeflow.bench.cpu_experts import SHAPES, bench_cpu_experts, plot, save
    from moeflow.quant.format import parse_quant

    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise MoeflowError(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    result = bench_cpu_experts(shapes, [int(t) for t in args.tokens.split(",")], args.reps, args.threads,
                               args.kernel, args.torch_max_tokens, parse_quant(args.quantize))
    if args.out:
        save(result, args.out)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


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


ENGINE = EngineConfig()
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")
# Every environment variable moeflow reads (`moeflow --help` lists them; the README's environment section too).
ENV_VARS = {
    "MOEFLOW_CACHE_DIR": "where the hardware profile is cached (default $XDG_CACHE_HOME/moeflow or ~/.cache/moeflow)",
    "MOEFLOW_CACHE": "where the native CPU kernel is built (default ~/.cache/moeflow)",
    "MOEFLOW_CPU_KERNEL": "native CPU kernel: auto | torch | scalar | avx2 | avx512 | amx | amx-emu (default auto)",
    "MOEFLOW_CPU_THREADS": "threads of the CPU expert kernel (default: the physical cores, less one)",
    "MOEFLOW_AMX_MIN_TOKENS": "fewest tokens of an expert that go to the AMX tiles (default 16)",
    "MOEFLOW_CPU_TORCH_FROM": "CPU jobs of this many tokens or more go to PyTorch (default 0: none)",
    "MOEFLOW_POOL_SPIN": "pause iterations the kernel's idle threads spin before they sleep (default 256)",
    "MOEFLOW_AMX_DOWN_ROWS, _GU_HIDDEN, _GU_ROWS": "AMX blocking (tuning; defaults in experts/native.py)",
    "MOEFLOW_AMX_PREFETCH": "AMX weight reads: 2 (default) loads tiles straight from the weights",
    "GOMP_SPINCOUNT": "OpenMP idle spin; moeflow sets 10000 unless you set it",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help, unless there is none to show or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Defaults in every --help; a bad flag is one `moeflow: error:` line and exit 2, as other errors are."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise MoeflowError(f"{self.prog}: {message}")


def _alias(g, old: str, dest: str) -> None:
    """An old spelling kept working, not shown in --help."""
    g.add_argument(old, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _model_flag(g, default: str | None = ENGINE.model) -> None:
    g.add_argument("--model", default=default, help="checkpoint folder, builtin:NAME or synthetic:NAME")


def _device_flags(g, offload: bool = True, deterministic: bool = True) -> None:
    g.add_argument("--device", choices=DEVICES, default=ENGINE.device, help="where the model runs (default: cuda "
                   "where available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=ENGINE.dtype,
                   help="auto: bf16 on cuda, the checkpoint's own on cpu")
    if deterministic:
        g.add_argument("--deterministic", action="store_true", default=ENGINE.deterministic,
                       help="batch-invariant forward: a request's greedy output does not depend on the requests "
                            "beside it (costs speed; docs/reliability.md)")
    if offload:
        from moeflow.policy import POLICIES

        g.add_argument("--gpu-memory", help="cap on GPU memory, e.g. 24GiB: experts stay in host memory and run "
                       "on the CPU or are copied in as the policy decides")
        g.add_argument("--policy", default="auto", choices=sorted(POLICIES), help="offloading policy")
        g.add_argument("--placement", help="resident experts from `moeflow profile-experts` (default: even split)")
        g.add_argument("--routing-trace", help="benchmarks: replay a recorded routing instead of the router's")
        g.add_argument("--quantize", help="int4 or int8 (-g32..-g128, -asym, -fp16): quantize the experts at load")
        g.add_argument("--expert-maps", help="policy fmoe: expert-map file to start from and write back to "
                       "(`moeflow maps build`)")


def _context_flag(g, help: str) -> None:
    g.add_argument("--max-len", type=int, default=ENGINE.max_len, help=help)
    _alias(g, "--max-context", "max_len")


def _sampling_flags(g, max_new_tokens: int, temperature: float, top_p: float, why: str) -> None:
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy ({why})")
    g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling: keep the most likely tokens "
                   "whose probabilities sum to this (1 = off)")
    g.add_argument("--top-k", type=int, default=_SP["top_k"], help="keep the k most likely tokens (0 = off)")
    g.add_argument("--seed", type=int, default=_SP["seed"], help="sampling seed (none: a fresh one each run)")


def build_parser() -> argparse.ArgumentParser:
    env = "\n".join(f"  {k}\n      {v}" for k, v in ENV_VARS.items())
    p = _Parser(prog="moeflow", description=__doc__, epilog=f"environment variables:\n{env}")
    p.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_commands(sub)
    _add_model_commands(sub)
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    from moeflow.quant import quality

    quality.add_parser(bsub)
    _add_bench_commands(bsub)
    return p


def _add_run_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    _model_flag(g)
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue (with --chat: the user message)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--system", help="system message (needs --chat)")
    _sampling_flags(g, _SP["max_new_tokens"], _SP["temperature"], _SP["top_p"], "greedy by default: reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="always produce --max-new-tokens tokens")
    _context_flag(g, "context to reserve (default: prompt + new tokens, at least 256)")
    _device_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the terminal (streamed; /reset, /exit)")
    _model_flag(c)
    c.add_argument("--system", help="system message")
    _sampling_flags(c, 256, 0.7, 0.9, "sampled by default: conversation reads better")
    _context_flag(c, "tokens of conversation kept, the oldest turns dropped (default: the model's context)")
    _device_flags(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, streaming, metrics); "
                        "requests' sampling defaults are the OpenAI API's (temperature 1)")
    _model_flag(sv)
    sv.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    sv.add_argument("--max-running", type=int, default=ENGINE.max_running,
                    help="sequences decoded together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429")
    _context_flag(sv, "prompt + generated tokens per request (default: the model's context)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's and moeflow's log level")
    _device_flags(sv)
    sv.set_defaults(func=cmd_serve)

    from moeflow.batch.cli import add_parser as add_batch_parser
    add_batch_parser(sub)


def _add_model_commands(sub) -> None:
    from moeflow.maps import commands as maps_commands
    maps_commands.add_parser(sub)
    pe = sub.add_parser("profile-experts", help="count how often each expert is used, for --placement")
    _model_flag(pe)
    pe.add_argument("--prompts", help="prompt file (JSONL with turns/text/prompt, or one prompt per line)")
    pe.add_argument("--trace", help="a recorded routing trace instead of prompts")
    pe.add_argument("--out", required=True, help="placement JSON to write")
    pe.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    _context_flag(pe, "context per prompt (default: the model's)")
    _device_flags(pe, offload=False, deterministic=False)
    pe.set_defaults(func=cmd_profile_experts)

    pr = sub.add_parser("profile", help="measure this machine once (cached): bandwidths, expert times, links")
    pr.add_argument("--model", default="synthetic:mixtral-8x7b", help="whose expert shape to time")
    pr.add_argument("--device", default="cuda", choices=DEVICES,
                    help="cuda (the CPU side only where no GPU is visible) or cpu")
    pr.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    pr.add_argument("--out", help="also write the profile JSON here")
    pr.add_argument("--quick", action="store_true", help="tiny sizes (tests, smoke runs): rough figures")
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="predict each policy's speed from the hardware profile; choose a plan")
    pl.add_argument("--model", default="synthetic:mixtral-8x7b", help="folder, builtin:NAME or synthetic:NAME "
                    "(only its config is read)")
    pl.add_argument("--gpu-memory", required=True, help="GPU budget, e.g. 24GiB")
    pl.add_argument("--workload", default="both", choices=("latency", "throughput", "both"),
                    help="one request at a time, batches, or both")
    pl.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of the modelled request")
    pl.add_argument("--max-new-tokens", dest="gen_len", type=int, default=128, help="tokens it generates")
    _alias(pl, "--gen-len", "gen_len")
    pl.add_argument("--profile", help="hardware profile JSON (default: this machine's, else the built-in reference)")
    pl.add_argument("--placement", help="expert popularity from `moeflow profile-experts` (default: uniform)")
    pl.add_argument("--hit-rate", type=float, help="assume this decode hit rate, in [0, 1], instead of deriving it")
    pl.add_argument("--quantize", help="int4 or int8: plan with the experts quantized (their real bytes)")
    pl.add_argument("--host-memory", help="host memory the throughput plan may use (default: 90%% of the profile's)")
    pl.add_argument("--roofline", help="write the hierarchical roofline PNG here")
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("synth", help="write random weights of a published shape as a Hugging Face folder")
    s.add_argument("name", help="mixtral-8x7b, qwen3-30b-a3b, tiny-mixtral or tiny-qwen3")
    s.add_argument("--out", required=True, help="folder to write")
    s.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the preset's own")
    s.set_defaults(func=cmd_synth)

    from moeflow.train.demo import SIZES
    t = sub.add_parser("train-demo", help="train the embedded demo model (a small Mixtral) on a text corpus")
    t.add_argument("--corpus", required=True, help="folder of .txt/.rst/.md files (e.g. the Python docs sources)")
    t.add_argument("--out", required=True, help="folder to write the Hugging Face checkpoint into")
    t.add_argument("--size", default="demo", choices=list(SIZES), help="demo (GPU, minutes), tiny (CPU), test")
    t.add_argument("--minutes", type=float, default=7.0, help="wall-clock limit on training; export follows")
    t.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    t.add_argument("--device", choices=DEVICES, help="cuda or cpu (default: cuda where available)")
    for name, typ in TRAIN_FLAGS.items():
        t.add_argument(f"--{name.replace('_', '-')}", type=typ,
                       help=f"default: {getattr(SIZES['demo'], name)} (--size demo)")
    t.set_defaults(func=cmd_train_demo)


def _add_bench_commands(bsub) -> None:
    bg = bsub.add_parser("generate", help="prefill and decode speed of one request, against the bound")
    bg.add_argument("--model", action="append", default=[], help="repeatable (default: the embedded default)")
    _device_flags(bg, offload=False, deterministic=False)
    bg.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    bg.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128, help="tokens decoded per run")
    _alias(bg, "--new-tokens", "new_tokens")
    bg.add_argument("--runs", type=int, default=3, help="runs per model (the best is reported)")
    bg.add_argument("--out", help="write the results as JSON here")
    bg.set_defaults(func=cmd_bench)

    bl = bsub.add_parser("latency", help="one request, experts offloaded: every policy against the bound")
    bl.add_argument("--model", default="synthetic:mixtral-8x7b", help="checkpoint folder, builtin:NAME or "
                    "synthetic:NAME")
    _device_flags(bl, offload=False, deterministic=False)
    bl.add_argument("--quantize", help="int4 or int8: the experts quantized at load (synthetic:NAME-int4 alike)")
    bl.add_argument("--budgets", default="24GiB,76GiB", help="comma-separated GPU budgets")
    bl.add_argument("--policies", default="auto,fiddler,lru", help="comma-separated offloading policies")
    bl.add_argument("--prompts", help="prompt file: the first --runs prompts are decoded in turn, all of them fill "
                    "the TTFT prompt")
    bl.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128, help="tokens decoded per run")
    _alias(bl, "--new-tokens", "new_tokens")
    bl.add_argument("--runs", type=int, default=1, help="decode runs per configuration (median reported)")
    bl.add_argument("--repeat", type=int, default=1, help="all rows this many times over, in turn (model-accuracy "
                    "compares the medians per configuration)")
    bl.add_argument("--ttft-len", type=int, default=512, help="prompt length of the TTFT measurement")
    bl.add_argument("--routing-trace", action="append", default=[], help="also replay this trace (repeatable)")
    bl.add_argument("--placement", help="placement for native routing")
    bl.add_argument("--trace-placement", help="placement for the trace runs")
    bl.add_argument("--trace-only", action="store_true", help="only the --routing-trace rows (no native routing)")
    bl.add_argument("--expert-maps", help="policy fmoe, trace runs: expert-map file to start from "
                    "(`moeflow maps build`)")
    bl.add_argument("--baseline-tokens", type=int, default=0,
                    help="also run transformers + accelerate for this many new tokens (GPU only; 0 = skip)")
    bl.add_argument("--profile", help="hardware profile JSON the predictions start from (default on a GPU: this "
                    "machine's cached one, measured if missing; on a CPU: none, no predictions)")
    bl.add_argument("--out", help="write the results as JSON here")
    bl.set_defaults(func=cmd_bench_latency)

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
    from moeflow.bench.throughput import add_parser as add_throughput_parser
    add_throughput_parser(bsub)

    from moeflow.bench import fuzz, soak
    soak.add_parser(bsub)
    fuzz.add_parser(bsub)

    bc = bsub.add_parser("cpu-experts", help="a layer's experts on the CPU: native kernel and PyTorch against "
                         "the memory-read ceiling")
    bc.add_argument("--shapes", default="mixtral,qwen3", help="comma-separated: mixtral, qwen3")
    bc.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256", help="tokens per expert, comma-separated")
    bc.add_argument("--reps", type=int, default=10, help="timed repetitions per point (median reported)")
    bc.add_argument("--threads", type=int, help="kernel (and PyTorch) threads (default: the physical cores)")
    bc.add_argument("--kernel", default=None, help="native path (default: MOEFLOW_CPU_KERNEL or auto)")
    bc.add_argument("--torch-max-tokens", type=int, default=256, help="skip PyTorch above this many tokens")
    bc.add_argument("--quantize", help="int4 or int8: the quantized experts' path (GB/s of packed weights)")
    bc.add_argument("--out", help="write the results as JSON here")
    bc.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    bc.set_defaults(func=cmd_bench_cpu_experts)

    from moeflow.bench import cache as bench_cache
    bench_cache.add_parser(bsub)

def check_args(args) -> None:
    """Every value that can be checked without loading anything, before any heavy work."""
    import math

    for name in ("max_new_tokens", "new_tokens", "gen_len", "max_len", "max_running", "num_prompts", "max_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise MoeflowError(f"--{name.replace('_', '-')} must be at least 1")
    t = getattr(args, "temperature", 0)
    if not (math.isfinite(t) and t >= 0):
        raise MoeflowError(f"--temperature must be a finite number >= 0 (got {t})")
    if not 0 < getattr(args, "top_p", 1) <= 1:
        raise MoeflowError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if getattr(args, "top_k", 0) < 0:
        raise MoeflowError(f"--top-k must be >= 0, 0 = off (got {args.top_k})")
    hit = getattr(args, "hit_rate", None)
    if hit is not None and not 0 <= hit <= 1:
        raise MoeflowError(f"--hit-rate is a fraction in [0, 1] (got {hit})")
    if getattr(args, "system", None) and getattr(args, "chat", True) is False:
        raise MoeflowError("--system needs --chat (the system message goes through the chat template)")
    if getattr(args, "gpu_memory", None) is not None and getattr(args, "command", None) != "plan":
        _check_gpu_memory(args)
    if getattr(args, "bench", None) == "latency":
        from moeflow.config import parse_size

        [parse_size(b) for b in args.budgets.split(",")]
        if args.runs < 1 or args.repeat < 1:
            raise MoeflowError(f"--runs and --repeat must be at least 1 (got {args.runs} and {args.repeat})")


def _check_gpu_memory(args) -> None:
    import torch

    from moeflow.config import parse_size

    parse_size(args.gpu_memory)
    if getattr(args, "device", None) == "cpu" or not torch.cuda.is_available():
        raise MoeflowError("--gpu-memory caps the GPU's memory: it needs a CUDA GPU (none is visible here, "
                           "or --device cpu)")


def check_context(args, limit: int, n_prompt: int | None = None) -> None:
    """--max-len/--max-context against the model's limit; --max-new-tokens against what the context leaves."""
    for name in ("max_len",):
        v = getattr(args, name, None)
        if v is not None and v > limit:
            raise MoeflowError(f"--{name.replace('_', '-')} {v} is beyond the model's context ({limit} tokens)")
    if n_prompt is not None:
        room = min(args.max_len or limit, limit) - n_prompt - 1
        if 0 < room < args.max_new_tokens:  # (a prompt that does not fit is the engine's one-line error)
            print(f"moeflow: warning: --max-new-tokens {args.max_new_tokens} does not fit the context "
                  f"({n_prompt} prompt tokens of {min(args.max_len or limit, limit)}): at most {room} tokens",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "bench", None) == "generate" and not args.model:
            args.model = [DEFAULT_MODEL]
        check_args(args)
        return args.func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
