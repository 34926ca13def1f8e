"""The commands that read the machine and the model, and predict: `moeflow profile`, `moeflow profile-experts`,
`moeflow plan`, `moeflow bench model-accuracy`."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow import MoeflowError
from moeflow.engine.budget import gib as _gib
from moeflow.flags import DEFAULT_MODEL, DEVICES, ENGINE, alias, context_flag, device_flags, gpus_flag, model_flag


def add_parsers(sub) -> None:
    """profile-experts, profile and plan (`bench model-accuracy`: add_accuracy_parser)."""
    pe = sub.add_parser("profile-experts", help="count how often each expert is used, for --placement")
    model_flag(pe)
    pe.add_argument("--prompts", help="prompt file (JSONL with turns/text/prompt, or one prompt per line)")
    pe.add_argument("--trace", help="a recorded routing trace instead of prompts")
    pe.add_argument("--out", required=True, help="placement JSON to write")
    pe.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    context_flag(pe, "context per prompt (default: the model's)")
    device_flags(pe, offload=False, deterministic=False)
    pe.set_defaults(func=cmd_profile_experts)

    pr = sub.add_parser("profile", help="measure this machine once (cached): bandwidths, expert times, links")
    pr.add_argument("--model", default="synthetic:mixtral-8x7b", help="whose expert shape to time")
    pr.add_argument("--device", default="cuda", choices=DEVICES,
                    help="cuda (the CPU side only where no GPU is visible) or cpu")
    pr.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    pr.add_argument("--out", help="also write the profile JSON here")
    pr.add_argument("--quick", action="store_true", help="tiny sizes (tests, smoke runs): rough figures")
    pr.set_defaults(func=cmd_profile)
    _add_plan_parser(sub)


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="predict each policy's speed from the hardware profile; choose a plan")
    pl.add_argument("--model", default="synthetic:mixtral-8x7b", help="folder, builtin:NAME or synthetic:NAME "
                    "(only its config is read)")
    pl.add_argument("--gpu-memory", required=True, help="GPU budget, e.g. 24GiB")
    gpus_flag(pl)
    pl.add_argument("--workload", default="both", choices=("latency", "throughput", "both"),
                    help="one request at a time, batches, or both")
    pl.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of the modelled request")
    pl.add_argument("--max-new-tokens", dest="gen_len", type=int, default=128, help="tokens it generates")
    alias(pl, "--gen-len", "gen_len")
    pl.add_argument("--profile", help="hardware profile JSON (default: this machine's, else the built-in reference)")
    pl.add_argument("--placement", help="expert popularity from `moeflow profile-experts` (default: uniform)")
    pl.add_argument("--hit-rate", type=float, help="assume this decode hit rate, in [0, 1], instead of deriving it")
    pl.add_argument("--quantize", help="int4 or int8: plan with the experts quantized (their real bytes)")
    pl.add_argument("--host-memory", help="host memory the throughput plan may use (default: 90%% of the profile's)")
    pl.add_argument("--roofline", help="write the hierarchical roofline PNG here")
    pl.set_defaults(func=cmd_plan)


def add_accuracy_parser(bsub) -> None:
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


def cmd_profile_experts(args) -> int:

    if bool(args.prompts) == bool(args.trace):
        raise MoeflowError("give one of --prompts FILE or --trace FILE")
    placement = _trace_placement(args) if args.trace else _prompts_placement(args)
    placement.save(args.out)
    top = placement.counts.sum(1, keepdim=True)
    share = float((placement.counts.sort(1, descending=True).values[:, :1] / top.clamp(min=1)).mean())
    print(f"wrote {args.out}: {int(placement.counts.sum())} selections over {placement.counts.shape[0]} MoE layers; "
          f"the most used expert of a layer takes {share:.0%} of its selections on average")
    return 0


def _trace_placement(args):
    """Expert use counted from a recorded routing trace."""
    from moeflow.checkpoint import read_model_config
    from moeflow.experts.trace import load_trace
    from moeflow.policy.placement import Placement

    name, cfg = read_model_config(args.model or DEFAULT_MODEL)
    trace = load_trace(args.trace)
    trace.check(cfg)
    return Placement(name, trace.counts(cfg.num_experts))


def _prompts_placement(args):
    """Expert use counted while the model generates from each prompt (the router's picks, recorded)."""
    from tqdm import tqdm

    from moeflow.bench.prompts import read_prompts
    from moeflow.checkpoint import load
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams
    from moeflow.experts.trace import RoutingRecorder
    from moeflow.policy.placement import Placement

    ck = load(args.model or DEFAULT_MODEL, device=args.device or ENGINE.resolved_device(), dtype=args.dtype)
    recorder = RoutingRecorder(ck.model.experts, ck.cfg)
    ck.model.set_experts(recorder)
    engine = LLMEngine(ck, max_seqs=1, max_len=args.max_len, cuda_graphs=False)
    if args.max_new_tokens >= engine.max_len:
        raise MoeflowError(f"--max-new-tokens must be below the context ({engine.max_len})")
    for p in tqdm(read_prompts(args.prompts), desc="profiling", unit="prompt"):
        ids = engine.encode([{"role": "user", "content": p}])[: engine.max_len - args.max_new_tokens - 1]
        list(engine.stream(ids, SamplingParams(max_new_tokens=args.max_new_tokens)))
    return Placement(ck.name, recorder.counts)


def cmd_profile(args) -> int:
    from moeflow.checkpoint import read_model_config
    from moeflow.perf.measure import QUICK, Sizes, get_profile
    from moeflow.perf.profile import profile_path

    name, cfg = read_model_config(args.model)
    profile, how = get_profile(cfg, args.device, args.refresh, sizes=QUICK if args.quick else Sizes())
    if args.out:
        profile.save(args.out)
    print_profile(profile, cfg)
    where = args.out or profile_path(profile.device_name)
    print(f"{how}: {profile.source}; {'written to' if args.out else 'cached in'} {where}")
    if not profile.has_gpu:
        print("no GPU visible: the CPU side only was profiled; `moeflow plan` needs a GPU profile "
              "(--profile FILE from a GPU host, or the built-in reference)")
    return 0


def print_profile(p, cfg=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{p.host}: {p.cpu_model} ({p.cpu_threads} threads) + {p.gpu_name or 'no GPU'}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [("CPU memory read", f"{p.cpu_read_bw / 1e9:.1f} GB/s"), ("CPU matmul", f"{p.cpu_flops / 1e9:.1f} GFLOP/s")]
    if p.has_gpu:
        rows += [("host -> GPU (pinned)", f"{p.h2d_bw / 1e9:.1f} GB/s, {p.h2d_latency_s * 1e6:.0f} us"),
                 ("GPU -> host (pinned)", f"{p.d2h_bw / 1e9:.1f} GB/s, {p.d2h_latency_s * 1e6:.0f} us"),
                 ("CPU read + host -> GPU at once", f"{p.host_read_bw_shared / 1e9:.1f} GB/s"
                  if p.host_read_bw_shared else "not measured"),
                 ("GPU memory", f"{p.gpu_bw / 1e9:.0f} GB/s"), ("GPU bf16 matmul", f"{p.gpu_flops / 1e12:.0f} TFLOP/s")]
    rows.append(("layer overhead", f"{p.layer_overhead_s * 1e3:.3f} ms"))
    rows.append(("layer overhead per routed expert beyond 2", f"{p.expert_overhead_s * 1e3:.4f} ms"))
    for key, sec in p.resident_layers.items():
        rows.append((f"decode layer, experts on the GPU ({key})", f"{sec * 1e3:.3f} ms"))
    rows.append(("decode step's own host time", f"{p.step_overhead_s * 1e3:.3f} ms"))
    if p.prefill_overhead_s:
        rows.append(("layer overhead, prefill", ", ".join(f"{t * 1e3:.3f} ms at {n} tokens"
                                                          for n, t in zip(p.prefill_tokens, p.prefill_overhead_s))))
    for key, e in p.experts.items():
        ms = lambda v: "/".join(f"{x * 1e3:.2f}" for x in v)  # noqa: E731
        rows.append((f"expert {key} CPU ms @ {'/'.join(map(str, e['tokens']))} tok", ms(e["cpu_s"])))
        if p.has_gpu:
            rows += [(f"expert {key} GPU ms", ms(e["gpu_s"])), (f"expert {key} copy", f"{e['copy_s'] * 1e3:.2f} ms")]
    if p.probe_s:  # perf/probe.py: what `bench latency` compares the host's speed with
        rows.append(("speed probe: a decode step of the tiny engine", f"{p.probe_s * 1e3:.3f} ms"))
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def _plan_profile(args, cfg):
    """--profile FILE, else this machine's cached (or freshly measured) GPU profile, else the reference."""
    from moeflow.perf.measure import get_profile
    from moeflow.perf.profile import HardwareProfile, local_device_name, reference_profile

    if args.profile:
        p = HardwareProfile.load(args.profile)
        if not p.has_gpu:
            raise MoeflowError(f"{args.profile} was measured without a GPU; plan needs GPU figures (measure on a "
                               "GPU host, or leave --profile out for the built-in reference)")
        return p, f"profile {args.profile} ({p.host}, {p.source})"
    if local_device_name("cuda") != "cpu":
        p, how = get_profile(cfg, "cuda")
        return p, f"this machine's profile ({how}, {p.source})"
    return reference_profile(), "no GPU here and no --profile: the built-in reference profile of an H100 host " \
                                "(measured 2026-11-22), not this machine"


def cmd_plan(args) -> int:
    from rich.console import Console

    from moeflow.checkpoint import model_quant, read_model_config
    from moeflow.config import parse_size

    name, cfg = read_model_config(args.model)
    quant = model_quant(args.model, args.quantize)
    budget = parse_size(args.gpu_memory)
    profile, said = _plan_profile(args, cfg)
    world, all_reduce_s = getattr(args, "gpus", None) or 1, 0.0
    if world > 1:  # one rank's share of the model and the host (docs/multi-gpu.md)
        from moeflow.dist.plan import per_rank

        cfg, profile, all_reduce_s, ar_said = per_rank(cfg, profile, world, bool(args.placement), args.workload)
        said += f"; per GPU of {world}, all-reduce {ar_said}"
    con = Console(width=max(Console().width, 140), soft_wrap=True)
    con.print(f"{name} with --gpu-memory {_gib(budget)}; {said}")
    if not profile.has_shape(cfg):
        con.print(f"(expert times for {cfg.hidden_size}x{cfg.expert_intermediate_size} scaled from the shape the "
                  "profile measured)")
    hit = args.hit_rate
    if args.placement:
        from moeflow.policy.placement import Placement

        placement = Placement.load(args.placement)
        placement.check(name, cfg)
        hit = placement.counts.tolist()
    if args.workload in ("latency", "both"):
        _latency_plan(con, args, name, cfg, profile, budget, hit, quant, world, all_reduce_s)
    if args.workload in ("throughput", "both"):
        _throughput_plan(con, args, name, cfg, profile, budget, quant)
    if args.roofline:
        from moeflow.perf.roofline import draw, standard_kernels

        draw(profile, standard_kernels(cfg, args.prompt_len, args.prompt_len + args.gen_len),
             args.roofline, f"{name} on {profile.host} ({profile.gpu_name})")
        con.print(f"wrote {args.roofline}")
    return 0


def _latency_plan(con, args, name, cfg, profile, budget: int, hit, quant, world: int = 1,
                  all_reduce_s: float = 0.0) -> None:
    """The latency regime: each policy's predicted figures in a table, the bound, the chosen plan."""
    import torch
    from rich.table import Table

    from moeflow.perf.search import search_latency

    # a dense block is the config's (biases included); a quantized one the format's
    eb = _quant_bytes(cfg, quant) or cfg.expert_bytes(torch.bfloat16)
    plan = search_latency(cfg, profile, budget, args.prompt_len, args.gen_len, hit, name, expert_bytes=eb)
    if world > 1:
        from moeflow.dist.plan import plan_with_collectives

        plan = plan_with_collectives(plan, cfg, all_reduce_s)
    if quant is not None:
        con.print(f"experts in {quant.name}: {_gib(eb)} each (CPU and GPU expert times: the profile's dense ones)")
    t = Table(title=f"latency regime: one request, {args.prompt_len}-token prompt (predicted)")
    for col in ("policy", "decode tok/s", "TTFT s", "hit rate", "CPU ms/tok", "copy ms/tok", "GPU ms/tok",
                "overhead ms/tok", "binds", "bound tok/s"):
        t.add_column(col, justify="left" if col in ("policy", "binds") else "right")
    for p in plan.predictions.values():
        if p.error:
            t.add_row(p.policy, "-", "-", "-", "-", "-", "-", "-", "does not fit", "-")
            continue
        k = p.token
        t.add_row(p.policy + (" *" if p.policy == plan.policy else ""), f"{p.decode_tps:.2f}", f"{p.ttft_s:.2f}",
                  f"{p.hit_rate:.0%}", *(f"{v * 1e3:.1f}" for v in (k.cpu, k.copy, k.gpu, k.overhead)),
                  p.binding, f"{p.bound_tps:.2f}")
    con.print(t)
    for p in plan.predictions.values():
        if p.error:
            con.print(f"{p.policy}: {p.error}")
    best = plan.best
    thr = plan.copy_threshold
    shared = (f"{profile.host_read_bw_shared / 1e9:.0f} GB/s together, as measured while both run"
              if profile.host_read_bw_shared else "their sum; `moeflow profile --refresh` measures them at once")
    con.print(f"bound {best.bound_tps:.2f} tok/s at a {best.hit_rate:.0%} hit rate: the missing experts' weights "
              f"cross the CPU memory bus ({profile.cpu_read_bw / 1e9:.0f} GB/s) and PCIe "
              f"({profile.h2d_bw / 1e9:.0f} GB/s) at once ({shared}). Binding resource of {best.policy}: "
              f"{best.binding}.")
    b = best.budget
    con.print(f"plan: policy {plan.policy}; {b['slots']} expert slots ({b['resident']} resident, {b['cache']} "
              f"cache) after {_gib(b['dense_bytes'])} non-expert weights, {_gib(b['kv_bytes'])} KV, "
              f"{_gib(b['workspace_bytes'])} workspace; copying an expert beats the CPU from "
              + (f"{thr} token(s) routed to it" if thr else "no token count (the CPU always wins)")
              + (f"; resident: {', '.join(f'{layer}:{e}' for layer, e in plan.resident[:12])}"
                 f"{' ...' if len(plan.resident) > 12 else ''}" if args.placement else ""))


def _quant_bytes(cfg, quant) -> int | None:
    """One expert's block in a quantized format (None: dense)."""
    from moeflow.quant.format import expert_bytes

    return expert_bytes(cfg.expert_intermediate_size, cfg.hidden_size, quant) if quant else None


def _throughput_plan(con, args, name, cfg, profile, budget: int, quant=None) -> None:
    """The throughput regime: the best (N, mu, r_w, r_c, attention) plan found and its per-layer terms."""
    from rich.table import Table

    from moeflow.config import parse_size
    from moeflow.perf.search import search_throughput

    host = parse_size(args.host_memory) if args.host_memory else None
    try:
        tp = search_throughput(cfg, profile, budget, args.prompt_len, args.gen_len, host, name,
                               eb=_quant_bytes(cfg, quant))
    except MoeflowError as e:  # beside a latency plan, say why there is no throughput one (host memory)
        if args.workload == "throughput":
            raise
        con.print(f"throughput regime: {e}")
        return
    d = tp.as_dict()
    t = Table(title=f"throughput regime: batches of {args.prompt_len}-token prompts, {args.gen_len} new tokens "
              "(best plan found)")
    for col in ("N", "mu", "r_w", "r_c", "attention", "tok/s", "decode tok/s", "prefill s", "PCIe ms",
                "CPU ms", "GPU ms", "binds"):
        t.add_column(col, justify="right")
    t.add_row(str(d["N"]), str(d["mu"]), f"{d['r_w']:.2f}", f"{d['r_c']:.2f}", d["attention"],
              f"{d['tokens_per_s']:.0f}", f"{d['decode_tps']:.0f}", f"{d['prefill_s']:.1f}",
              *(f"{tp.terms[k] * 1e3:.1f}" for k in ("PCIe", "CPU memory bus", "GPU")), tp.binding)
    con.print(t)
    con.print(f"per decode layer: T = max(PCIe, CPU, GPU, host) = {tp.layer_s * 1e3:.1f} ms, bound by "
              f"{tp.binding}; GPU {_gib(tp.gpu_bytes)} of {_gib(budget)}, host {_gib(tp.host_bytes)}")


def cmd_bench_accuracy(args) -> int:
    from moeflow.bench.accuracy import accuracy_rows, load_results, plot, print_table
    from moeflow.checkpoint import read_model_config
    from moeflow.perf.profile import HardwareProfile

    results = load_results(args.results)
    _, cfg = read_model_config(args.model or results.get("model", "synthetic:mixtral-8x7b"))
    if results.get("profile") and not args.profile:
        profile = HardwareProfile.from_dict(results["profile"])
        said = f"the run's own profile ({profile.host}, {profile.source})"
    else:
        profile, said = _plan_profile(args, cfg)
    rows = accuracy_rows(results, profile, cfg, args.repredict)
    if not rows:
        raise MoeflowError(f"{args.results} holds no measured rows to compare")
    if args.repredict:
        print(f"every row predicted here, from {said}")
    elif any("predicted_decode_tps" not in r for r in results["rows"] if "error" not in r):
        print(f"rows without predictions are predicted here from {said}")
    print_table(rows)
    if args.plot:
        plot(rows, args.plot, f"{results.get('model', '')} on {results.get('device', '')} ({profile.host}), "
             f"measured {results.get('date', '?')}: `bench latency` medians against the timing model")
        print(f"wrote {args.plot}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0
