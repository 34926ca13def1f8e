"""The `moeflow` command: generate | chat | serve | profile | plan | profile-experts | synth | train-demo | bench."""

from __future__ import annotations

import argparse
import sys

from moeflow import MoeflowError, __version__
from moeflow.flags import DEFAULT_MODEL, DEFAULT_PROMPT, Parser, check_args  # noqa: F401  (moeflow.cli's API)

# Every environment variable moeflow reads, listed in `moeflow --help` (the README's table says the same;
# tests/test_seams.py checks both against the source).
ENV_VARS = {
    "MOEFLOW_CACHE_DIR": "moeflow's cache folder: hardware profiles, the native kernels' builds under ext/ "
                         "(default $XDG_CACHE_HOME/moeflow, else ~/.cache/moeflow)",
    "MOEFLOW_CPU_THREADS": "threads of the CPU expert kernel (default: the physical cores, one fewer beside a GPU)",
    "MOEFLOW_CPU_KERNEL": "native CPU kernel: auto | torch | scalar | avx2 | avx512 | amx | amx-emu (default auto)",
    "CXX": "the compiler of the native CPU kernels (default g++)",
    "GOMP_SPINCOUNT": "OpenMP idle spin; moeflow sets 10000 unless you set it",
}


def build_parser() -> argparse.ArgumentParser:
    """Each command's parser and run live beside its feature; here they are registered, in --help's order."""
    from moeflow import chat, generate, server, synthetic
    from moeflow.batch import cli as batch
    from moeflow.maps import commands as maps
    from moeflow.perf import commands as perf
    from moeflow.train import demo

    env = "\n".join(f"  {k}\n      {v}" for k, v in ENV_VARS.items())
    p = Parser(prog="moeflow", description=__doc__, epilog=f"environment variables:\n{env}")
    p.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for home in (generate, chat, server, batch, maps):
        home.add_parser(sub)
    perf.add_parsers(sub)  # profile-experts, profile, plan
    synthetic.add_parser(sub)
    demo.add_parser(sub)
    b = sub.add_parser("bench", help="benchmarks")
    _add_bench_commands(b.add_subparsers(dest="bench", required=True, parser_class=Parser))
    return p


def _add_bench_commands(bsub) -> None:
    from moeflow.bench import cache, commands, fuzz, serve, soak, throughput
    from moeflow.bench import generate as bench_generate
    from moeflow.quant import quality

    quality.add_parser(bsub)
    bench_generate.add_parser(bsub)
    commands.add_latency_parser(bsub)
    from moeflow.perf.commands import add_accuracy_parser
    add_accuracy_parser(bsub)
    bs = bsub.add_parser("serve", help="drive a running server with ShareGPT prompts (TTFT, TPOT, ITL, throughput)")
    serve.add_flags(bs)
    bs.set_defaults(func=serve.main)
    throughput.add_parser(bsub)
    soak.add_parser(bsub)
    fuzz.add_parser(bsub)
    commands.add_cpu_experts_parser(bsub)
    cache.add_parser(bsub)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        return args.func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
