"""The parsers of `moeflow bench latency` and `bench cpu-experts`, whose benchmarks live in bench/latency.py and
bench/cpu_experts.py."""

from __future__ import annotations

import sys

from moeflow import MoeflowError
from moeflow.flags import DEFAULT_PROMPT, alias, device_flags, gpus_flag


def add_latency_parser(bsub) -> None:
    bl = bsub.add_parser("latency", help="one request, experts offloaded: every policy against the bound")
    bl.add_argument("--model", default="synthetic:mixtral-8x7b", help="checkpoint folder, builtin:NAME or "
                    "synthetic:NAME")
    device_flags(bl, offload=False, deterministic=False)
    bl.add_argument("--quantize", help="int4 or int8: the experts quantized at load (synthetic:NAME-int4 alike)")
    bl.add_argument("--budgets", default="24GiB,76GiB", help="comma-separated GPU budgets")
    bl.add_argument("--policies", default="auto,fiddler,lru", help="comma-separated offloading policies")
    bl.add_argument("--prompts", help="prompt file: the first --runs prompts are decoded in turn, all of them fill "
                    "the TTFT prompt")
    bl.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128, help="tokens decoded per run")
    alias(bl, "--new-tokens", "new_tokens")
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
    gpus_flag(bl)
    bl.set_defaults(func=run_latency)


def run_latency(args) -> int:
    from moeflow.bench.latency import main
    from moeflow.dist.cli import spread

    if (rc := spread(args)) is not None:  # --gpus: on the ranks
        return rc
    return main(args, DEFAULT_PROMPT)


def add_cpu_experts_parser(bsub) -> None:
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
    from moeflow.bench.cpu_experts import add_kernel_flags

    add_kernel_flags(bc)
    bc.set_defaults(func=run_cpu_experts)


def run_cpu_experts(args) -> int:
    from moeflow.bench.cpu_experts import SHAPES, bench_cpu_experts, kernel_config, parse_variants, plot, save
    from moeflow.quant.format import parse_quant

    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise MoeflowError(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    result = bench_cpu_experts(shapes, [int(t) for t in args.tokens.split(",")], args.reps, args.threads,
                               args.kernel, args.torch_max_tokens, parse_quant(args.quantize), kernel_config(args),
                               parse_variants(args.variants, kernel_config(args)))
    if args.out:
        save(result, args.out)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0
