"""`moeflow bench latency`: one request at a time with experts offloaded, each policy side by side, against
the run's own physical bound and against transformers + accelerate on the same weights.

The bound of a run: per decode token, the weights of the experts that were not on the GPU
when used must cross the CPU's memory bus or PCIe, both at once: miss_bytes / (B_cpu + B_h2d); plus the
GPU's own time to read the non-expert weights and the experts it holds at its memory bandwidth.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moeflow import MoeflowError
from moeflow.bench.ceilings import _time, concurrent_host_read, memory_bandwidth
from moeflow.checkpoint import Checkpoint
from moeflow.config import OffloadConfig
from moeflow.dist.cli import engine_class, owned_experts
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.experts.local import LocalExperts
from moeflow.experts.trace import load_trace
from moeflow.perf.profile import engine_costs


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s from pinned host memory to the device (host to host on the CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _time(lambda: dst.copy_(src, non_blocking=True), device, repeats=5)


def ceilings(device: torch.device) -> dict:
    c = {"cpu_read_bw": memory_bandwidth(torch.device("cpu")), "h2d_bw": h2d_bandwidth(device),
         "gpu_bw": memory_bandwidth(device) / 2 if device.type == "cuda" else memory_bandwidth(device)}
    try:
        c |= concurrent_host_read(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # a figure beside the bound: report, go on
        print(f"concurrent CPU read + copy not measured: {e}", flush=True)
    return c


def _snapshot(engine: LLMEngine) -> dict:
    return engine.expert_stats() or {}


# OffloadStats' host timers
TIMERS = ("backend_s", "sync_s", "plan_s", "launch_s", "prefetch_s", "cpu_s", "cpu_kernel_s", "cpu_wait_s",
          "cpu_start_s")
TTFT_RUNS = 3  # prefills of the TTFT prompt per row: their median is its TTFT


def _allocator(dev: torch.device) -> dict:
    """The CUDA caching allocator's counters: a retry (frees cached blocks, syncs the device) or a cudaMalloc
    during decode costs milliseconds that no expert timer sees."""
    if dev.type != "cuda":
        return {}
    m = torch.cuda.memory_stats(dev)
    return {k: m.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b if k != "hit_rate"}


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + v for k, v in b.items()}


def run_policy(ck: Checkpoint, oc: OffloadConfig, prompts: list[list[int]], ttft_prompt: list[int],
               new_tokens: int, ceil: dict, costs=None, probe: Callable[[], float] | None = None) -> dict:
    """One engine under this offload config: TTFT of ttft_prompt, then each prompt decoded for new_tokens in
    turn. decode_tps is the median of those runs; the other figures count all of them together. probe(): the
    host's speed (perf/probe.py), read before the prefills, between them and the decodes, and after: `probes`
    holds each span's mean of its two ends."""
    dev = next(ck.model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    max_len = max(max(len(p) for p in prompts) + new_tokens, len(ttft_prompt) + 1) + 1
    engine = engine_class()(ck, max_seqs=1, max_len=max_len, offload=oc,  # over the ranks with --gpus
                       expert_costs=costs if costs is not None else engine_costs(ck, oc))
    backend = getattr(engine.model.experts, "inner", engine.model.experts)
    try:
        # A short request first: the first prefill of a fresh engine pays one-time costs (the kernels' first
        # launches, the pinned staging buffers, the CPU pool's start) that a server pays once, not per request.
        list(engine.stream(ttft_prompt[:16], SamplingParams(max_new_tokens=2, ignore_eos=True)))
        read = [probe() if probe else None]
        ttft, prefill = _ttft(ck, engine, backend, ttft_prompt, dev)
        read.append(probe() if probe else None)
        tps, dt, d, allocs = _decodes(engine, prompts, new_tokens, dev)
        read.append(probe() if probe else None)
        row = _row(ck, oc, d, tps, dt, (new_tokens - 1) * len(prompts), ceil, dev)
        return row | {
            "ttft_s": ttft, "ttft_prompt_tokens": len(ttft_prompt), "allocator_during_decode": allocs,
            "prefill": prefill,
            "probes": {"ttft": (read[0] + read[1]) / 2, "decode": (read[1] + read[2]) / 2} if probe else None,
            "budget": engine.budget, "costs": backend.costs.as_dict() if backend.costs else None,
            # the engine's corrections of those costs at the end (CPU per regime, copies), for reading the model
            "corrections": {"cpu": list(getattr(backend, "cpu_scales", [])),
                            "copy": getattr(backend, "copy_scale", None)},
        }
    finally:
        backend.close()
        ck.model.set_experts(LocalExperts(ck.store))
        del engine, backend
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, dev)


def _ttft(ck: Checkpoint, engine, backend, ttft_prompt: list[int], dev) -> tuple[float, dict | None]:
    """The TTFT prompt's median time to first token, and where its time went in the expert backend (ms, a
    prefill's mean) and its experts' paths."""
    p0, pa = _snapshot(engine), _allocator(dev)
    shape = getattr(backend, "prompt_shape", None)
    if shape is not None:
        shape.reset()  # this prompt's routing alone
    # the median of a few: one prefill on a shared host ran 0.16 s and 0.27 s in the same call
    ttfts = [list(engine.stream(ttft_prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))[-1].ttft_s
             for _ in range(TTFT_RUNS)]
    ttft = statistics.median(ttfts)
    pd = {k: v / TTFT_RUNS for k, v in _delta(p0, _snapshot(engine)).items()} if p0 else {}
    if not pd:
        return ttft, None
    return ttft, {"ms": {"ttft": ttft * 1e3, **{k[:-2]: pd[k] * 1e3 for k in TIMERS}},
                  "ttft_runs_s": ttfts, "cpu_experts": pd["cpu_experts"], "copied_experts": pd["copied_experts"],
                  "hit_rate": pd["hits"] / max(pd["lookups"], 1),
                  "experts_per_layer": pd["lookups"] / len(ck.cfg.moe_layers),
                  "tokens_per_expert": [round(n, 2) for n in shape.mean()] if shape else [],
                  "allocator": _delta(pa, _allocator(dev))}


def _decodes(engine, prompts: list[list[int]], new_tokens: int, dev) -> tuple[list[float], float, dict, dict]:
    """Each prompt decoded for new_tokens after its prefill: tok/s of each, the decode seconds, and the
    backend's and the allocator's counters over all of them."""
    dt, d, allocs, tps = 0.0, {}, {}, []
    for prompt in prompts:
        seq = engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        engine.step()                                           # prefill and the first token
        s0, a0, t0 = _snapshot(engine), _allocator(dev), time.perf_counter()
        while not seq.finished:
            engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter() - t0
        tps.append((new_tokens - 1) / t)
        dt += t
        d = _add(d, _delta(s0, _snapshot(engine)))
        allocs = _add(allocs, _delta(a0, _allocator(dev)))
    return tps, dt, d, allocs


def _row(ck: Checkpoint, oc: OffloadConfig, d: dict, tps: list[float], dt: float, n: int, ceil: dict, dev) -> dict:
    """The decode figures of n tokens: rates, shares of the experts' paths, the bound, host time per token."""
    eb = ck.store.expert_bytes
    gpu_s = (ck.dense_bytes - ck.model.embed_tokens.weight.nbytes + d["hits"] * eb / n) / ceil["gpu_bw"]
    bound_s = d["miss_bytes"] / n / (ceil["cpu_read_bw"] + ceil["h2d_bw"]) + gpu_s
    # the same with the rates the CPU and the copy engine get while both draw on host memory
    shared = ceil.get("cpu_read_bw_concurrent", 0) + ceil.get("h2d_bw_concurrent", 0)
    shared_s = d["miss_bytes"] / n / shared + gpu_s if shared else None
    lookups, tps_med = max(d["lookups"], 1), statistics.median(tps)
    return {
        "policy": oc.policy, "gpu_memory_gib": oc.gpu_memory / 2**30,
        "routing": Path(oc.routing_trace).name if oc.routing_trace else "native",
        "decode_tps": tps_med, "decode_tps_runs": tps,
        "hit_rate": d["hits"] / lookups, "h2d_bytes_per_token": d["bytes_h2d"] / n,
        "share_cpu": d["cpu_experts"] / lookups, "share_gpu_resident": d["resident_hits"] / lookups,
        "share_gpu_cached": (d["hits"] - d["resident_hits"]) / lookups,
        "share_gpu_copied": d["copied_experts"] / lookups,
        "bound_tps": 1 / bound_s, "fraction_of_bound": tps_med * bound_s,
        "shared_bound_tps": 1 / shared_s if shared_s else None,
        "fraction_of_shared_bound": tps_med * shared_s if shared_s else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        # per decode token (ms): the whole step, inside the expert backend, the parts of that
        # (join: the backend's time after the launch: waiting for the CPU's share and adding it)
        "ms_per_token": {"step": dt / n * 1e3, "outside_experts": (dt - d["backend_s"]) / n * 1e3,
                         **{k[:-2]: d[k] / n * 1e3 for k in TIMERS},
                         "join": (d["backend_s"] - d["sync_s"] - d["plan_s"] - d["launch_s"]) / n * 1e3},
        # experts copied ahead by the policy per decode token, and of those used or wasted when their layer came
        "prefetch_per_token": {k: d.get(f, 0) / n for k, f in (("copied", "prefetched"), ("used", "prefetch_used"),
                                                               ("wasted", "prefetch_wasted"))},
        "cpu_probes": d.get("cpu_probes", 0),  # layers whose CPU share tested the CPU estimate
    }


def print_rows(rows: list[dict], header: bool = False) -> None:
    head = f"{'policy':<24}{'GiB':>5} {'routing':<22}{'tok/s':>7}{'TTFT s':>8}{'hit':>6}{'cpu':>6}{'copy':>6}" \
           f"{'bound':>7}{'of bound':>9}{'peak GiB':>9}"
    if header:
        print(head)
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        peak = f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r.get("peak_gpu_bytes") else "-"
        print(f"{r['policy']:<24}{r['gpu_memory_gib']:>5.0f} {r['routing'][:21]:<22}{f('decode_tps', '.2f'):>7}"
              f"{f('ttft_s', '.2f'):>8}{f('hit_rate', '.2f'):>6}{f('share_cpu', '.2f'):>6}"
              f"{f('share_gpu_copied', '.2f'):>6}{f('bound_tps', '.2f'):>8}{f('fraction_of_bound', '.2f'):>9}{peak:>9}",
              flush=True)
        if r.get("shared_bound_tps"):
            print(f"    bound with the host memory shared by CPU and copies: {r['shared_bound_tps']:.2f} tok/s "
                  f"({r['fraction_of_shared_bound']:.2f} of it)", flush=True)
        if r.get("host_speed"):
            print("    host's time against the profile's: " + ", ".join(
                f"{k} x{v:.2f}" for k, v in r["host_speed"].items()) +
                f"; predicted at the profile's speed: {r['predicted_decode_tps_at_profile_speed']:.2f} tok/s, "
                f"TTFT {r['predicted_ttft_s_at_profile_speed']:.2f} s", flush=True)
        if r.get("ms_per_token"):
            print("    ms/token: " + ", ".join(f"{k} {v:.1f}" for k, v in r["ms_per_token"].items()), flush=True)
        if r.get("cpu_probes"):
            print(f"    CPU probes (layers that tested the CPU estimate): {r['cpu_probes']}", flush=True)
        if (r.get("prefetch_per_token") or {}).get("copied"):
            print("    prefetched/token: " + ", ".join(f"{k} {v:.2f}" for k, v in r["prefetch_per_token"].items()),
                  flush=True)
        if r.get("prefill"):
            p = r["prefill"]
            busy = {k: v for k, v in p.get("allocator", {}).items() if v}  # allocator work inside the prompt
            print("    prefill ms: " + ", ".join(f"{k} {v:.1f}" for k, v in p["ms"].items()) +
                  f"; experts on CPU {p['cpu_experts']:.1f}, copied {p['copied_experts']:.1f}" +
                  (f"; allocator {busy}" if busy else ""), flush=True)


def save(meta: dict, rows: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(meta | {"rows": rows}, indent=2, default=str))


# -- `moeflow bench latency` -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_traces(tokens: dict[str, int], needs: dict[str, int]) -> None:
    """A replayed trace must cover a whole request: shorter, its replay would wrap round within one."""
    for path, n in tokens.items():
        for what, need in needs.items():
            if n < need:
                raise MoeflowError(f"routing trace {Path(path).name} has {n} tokens, fewer than {what} needs "
                                   f"({need}): replay a longer trace or ask for fewer tokens")


def main(args, default_prompt: str) -> int:
    """Load once, measure the ceilings, then every budget x routing x policy row (--repeat times over)."""
    from moeflow.bench.prompts import read_prompts
    from moeflow.checkpoint import load, resolve_device
    from moeflow.config import parse_size
    from moeflow.engine.llm_engine import encode_prompt

    budgets = [parse_size(b) for b in args.budgets.split(",")]  # checked before anything is built
    trace_tokens = {t: load_trace(t).ids.shape[0] for t in args.routing_trace}
    check_traces(trace_tokens, {"--ttft-len": args.ttft_len, "--new-tokens": args.new_tokens})
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = time.perf_counter()
    ck = load(args.model, device=device, dtype=args.dtype, expert_device="cpu", progress=True, quant=args.quantize,
              owned=owned_experts(args))  # --gpus: this rank's experts only
    load_s, t = time.perf_counter() - t, time.perf_counter()
    ck.store.pin()
    pin_s = time.perf_counter() - t
    ceil = ceilings(device)
    profile = _profile(args, ck, device)
    print(f"{ck.name}: built/loaded in {load_s:.1f} s, pinned in {pin_s:.1f} s; CPU read "
          f"{ceil['cpu_read_bw'] / 1e9:.0f} GB/s, host->device {ceil['h2d_bw'] / 1e9:.0f} GB/s, "
          f"device memory {ceil['gpu_bw'] / 1e9:.0f} GB/s", flush=True)
    if "h2d_bw_concurrent" in ceil:
        print(f"both at once: CPU read {ceil['cpu_read_bw_concurrent'] / 1e9:.0f} GB/s + host->device "
              f"{ceil['h2d_bw_concurrent'] / 1e9:.0f} GB/s", flush=True)
    texts = read_prompts(args.prompts) if args.prompts else [default_prompt]
    prompts = [encode_prompt(ck.tokenizer, [{"role": "user", "content": texts[i % len(texts)]}])
               for i in range(args.runs)]
    check_traces(trace_tokens, {"a prompt with its --new-tokens": max(map(len, prompts)) + args.new_tokens})
    long = [t for p in texts for t in encode_prompt(ck.tokenizer, p)]
    ttft_prompt = (long * (args.ttft_len // max(len(long), 1) + 1))[: args.ttft_len]
    meta = {"model": ck.name, "device": device_name(device), "load_s": load_s, "pin_s": pin_s,
            "ceilings": ceil, "new_tokens": args.new_tokens, "runs": args.runs, "repeat": args.repeat,
            "prompt_tokens": [len(p) for p in prompts], "date": time.strftime("%Y-%m-%d %H:%M")}
    if profile is not None:  # what the predictions came from: `bench model-accuracy --repredict` reuses it
        from dataclasses import asdict

        meta["profile"] = asdict(profile)
    probe = None
    if profile is not None:  # the host's speed beside each row, against the profile's reading
        from moeflow.perf.probe import SpeedProbe

        probe = SpeedProbe(device)
        probe()  # its engine made before the rows
    rows = _all_rows(args, ck, budgets, prompts, ttft_prompt, ceil, profile, probe, meta)
    if probe is not None:
        probe.close()
    if args.out:
        save(meta, rows, args.out)
    return 0


def _profile(args, ck: Checkpoint, device: torch.device):
    if args.profile:  # the timing model's predictions go beside each measurement
        from moeflow.perf.profile import HardwareProfile

        return HardwareProfile.load(args.profile)
    if device.type == "cuda":
        from moeflow.perf.measure import checkpoint_profile

        return checkpoint_profile(ck)
    return None


def _all_rows(args, ck, budgets, prompts, ttft_prompt, ceil, profile, probe, meta) -> list[dict]:
    """--repeat: every row again, in the same order, so that a slow spell of a shared host falls on one
    repetition of each configuration rather than on all of one (model-accuracy takes the medians)."""
    from moeflow.perf.costs import ExpertCosts

    rows, costs = [], None
    print_rows([], header=True)
    for rep in range(args.repeat):
        for budget in budgets:
            for trace in ([] if getattr(args, "trace_only", False) else [None]) + args.routing_trace:
                for policy in args.policies.split(","):
                    maps = getattr(args, "expert_maps", None) if trace is not None and policy == "fmoe" else None
                    oc = OffloadConfig(budget, policy, args.placement if trace is None else args.trace_placement,
                                       trace, expert_maps=maps)
                    r = _one_row(ck, oc, prompts, ttft_prompt, args.new_tokens, ceil, costs, probe, profile)
                    if costs is None and r.get("costs"):
                        costs = ExpertCosts.from_dict(r["costs"])
                    rows.append(r | {"repeat": rep})
                    if "error" not in r:
                        print_rows([r])
                    if args.out:  # each row as it lands: a run cut short keeps what it measured
                        save(meta, rows, args.out)
            if args.baseline_tokens and meta["device"] != "cpu" and rep == 0:
                rows.append(_baseline(ck, budget, prompts[0], args.baseline_tokens))
    return rows


def _one_row(ck, oc: OffloadConfig, prompts, ttft_prompt, new_tokens, ceil, costs, probe, profile) -> dict:
    """A failed row is recorded and the others still run (device time is scarce)."""
    import traceback

    from moeflow import MoeflowError
    from moeflow.bench.accuracy import predict_row

    try:
        r = run_policy(ck, oc, prompts, ttft_prompt, new_tokens, ceil, costs, probe)
        if profile is not None:
            dtype = str(ck.store.dtype).removeprefix("torch.")
            r |= predict_row(r, ck.cfg, profile, ck.name, new_tokens, dtype_name=dtype)
        return r
    except Exception as e:
        msg = str(e) if isinstance(e, MoeflowError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, MoeflowError):
            traceback.print_exc()
        print(f"{oc.policy} at {oc.gpu_memory / 2**30:.0f} GiB: {msg}", flush=True)
        return {"policy": oc.policy, "gpu_memory_gib": oc.gpu_memory / 2**30, "routing": oc.routing_trace or "native",
                "error": msg}


def _baseline(ck, budget: int, prompt: list[int], tokens: int) -> dict:
    try:
        from moeflow.bench.accelerate_baseline import accelerate_baseline

        row = accelerate_baseline(ck, budget, prompt, tokens)
        print_rows([row])
        return row
    except Exception as e:  # the baseline is someone else's code: record its failure, keep going
        print(f"transformers+accelerate failed: {e}", flush=True)
        return {"policy": "transformers+accelerate", "gpu_memory_gib": budget / 2**30,
                "error": f"{type(e).__name__}: {e}"}
