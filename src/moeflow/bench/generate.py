"""`moeflow bench generate`: prefill and decode speed of one request, against the bound of the run.

Decode bound: bytes one token must read (every non-expert weight but the embedding table, the active
experts, the KV cache) over the measured memory bandwidth. Prefill bound: 2 x active parameters x
tokens over the measured matmul rate (or the bytes bound, if larger).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from moeflow.bench.ceilings import matmul_rate, memory_bandwidth
from moeflow.checkpoint import Checkpoint
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.flags import DEFAULT_MODEL, ENGINE, alias, device_flags


def add_parser(bsub) -> None:
    bg = bsub.add_parser("generate", help="prefill and decode speed of one request, against the bound")
    bg.add_argument("--model", action="append", default=[], help="repeatable (default: the embedded default)")
    device_flags(bg, offload=False, deterministic=False)
    bg.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    bg.add_argument("--max-new-tokens", dest="new_tokens", type=int, default=128, help="tokens decoded per run")
    alias(bg, "--new-tokens", "new_tokens")
    bg.add_argument("--runs", type=int, default=3, help="runs per model (the best is reported)")
    bg.add_argument("--out", help="write the results as JSON here")
    bg.set_defaults(func=run)


def run(args) -> int:
    from moeflow.checkpoint import load

    results = []
    for model in args.model or [DEFAULT_MODEL]:
        t = time.perf_counter()
        ck = load(model, device=args.device or ENGINE.resolved_device(), dtype=args.dtype, progress=None)
        load_s = time.perf_counter() - t
        results.append(bench_generate(ck, args.prompt_len, args.new_tokens, args.runs) | {"load_s": load_s})
        print_result(results[-1])
        del ck
    if args.out:
        save(results, args.out)
    return 0


def host_info(device: torch.device) -> dict:
    info = {"host": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def active_bytes(ck: Checkpoint) -> tuple[int, int]:
    """(bytes of weights read per decode token, active parameters per token)."""
    cfg, itemsize = ck.cfg, ck.store.dtype.itemsize
    dense = sum(p.numel() for n, p in ck.model.named_parameters() if not n.startswith("embed_tokens"))
    experts = len(cfg.moe_layers) * cfg.num_experts_per_tok * cfg.expert_numel
    expert_bytes = len(cfg.moe_layers) * cfg.num_experts_per_tok * ck.store.expert_bytes  # quantized: packed
    return dense * itemsize + expert_bytes, dense + experts


def bench_generate(ck: Checkpoint, prompt_len: int = 512, new_tokens: int = 128, runs: int = 3,
                   seed: int = 0) -> dict:
    device = next(ck.model.parameters()).device
    engine = LLMEngine(ck, max_seqs=1, max_len=prompt_len + new_tokens + 1)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, ck.cfg.vocab_size - 10, (prompt_len,), generator=g).tolist()
    list(engine.stream(prompt[:32], SamplingParams(max_new_tokens=8, ignore_eos=True)))  # warm-up
    results = []
    for _ in range(runs):
        *_, last = engine.stream(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        results.append(last)
    bw, flops = memory_bandwidth(device), matmul_rate(device)
    weight_bytes, active_params = active_bytes(ck)
    kv_bytes = ck.cfg.kv_bytes_per_token(ck.store.dtype) * (prompt_len + new_tokens // 2)
    decode_bound = bw / (weight_bytes + kv_bytes)
    prefill_bound = 1 / max(2 * active_params * prompt_len / flops, weight_bytes / bw) * prompt_len
    decode = statistics.median(r.decode_tps for r in results)
    prefill = statistics.median(r.prefill_tps for r in results)
    return {
        "model": ck.name, "device": str(device), "dtype": str(ck.store.dtype).removeprefix("torch."),
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "runs": runs,
        "decode_tok_s": decode, "decode_tok_s_all": [r.decode_tps for r in results],
        "prefill_tok_s": prefill, "ttft_s": statistics.median(r.ttft_s for r in results),
        "peak_memory_gib": max(r.peak_memory for r in results) / 2**30,
        "ceilings": {"memory_GB_s": bw / 1e9, "matmul_TFLOP_s": flops / 1e12},
        "decode_bytes_per_token_GB": (weight_bytes + kv_bytes) / 1e9,
        "decode_bound_tok_s": decode_bound, "decode_fraction_of_bound": decode / decode_bound,
        "prefill_bound_tok_s": prefill_bound, "prefill_fraction_of_bound": prefill / prefill_bound,
        **host_info(device),
    }


def print_result(r: dict) -> None:
    print(f"{r['model']} on {r.get('gpu', r['device'])} ({r['dtype']}), prompt {r['prompt_tokens']}, "
          f"{r['new_tokens']} new tokens, median of {r['runs']}:\n"
          f"  decode  {r['decode_tok_s']:8.1f} tok/s   bound {r['decode_bound_tok_s']:8.1f}  "
          f"({r['decode_fraction_of_bound']:.0%}; {r['decode_bytes_per_token_GB']:.2f} GB/token at "
          f"{r['ceilings']['memory_GB_s']:.0f} GB/s)\n"
          f"  prefill {r['prefill_tok_s']:8.1f} tok/s   bound {r['prefill_bound_tok_s']:8.1f}  "
          f"({r['prefill_fraction_of_bound']:.0%}; matmul {r['ceilings']['matmul_TFLOP_s']:.0f} TFLOP/s)  "
          f"TTFT {r['ttft_s'] * 1000:.0f} ms   peak memory {r['peak_memory_gib']:.1f} GiB"
          + (f"   load {r['load_s']:.1f} s" if "load_s" in r else ""))


def save(results: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
