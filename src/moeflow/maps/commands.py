"""`moeflow maps build`: an expert-map file built offline from a routing trace's requests."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.maps.store import DEFAULT_CAPACITY
from moeflow.maps.traces import load_requests


def parse_range(spec: str | None, n: int) -> range:
    """`A:B` (either side may be empty) over n requests; None: the first 80% (the rest left to score)."""
    if spec is None:
        return range(max(1, round(0.8 * n)) if n > 1 else n)
    try:
        a, b = (s.strip() for s in spec.split(":"))
        r = range(int(a) if a else 0, int(b) if b else n)
    except ValueError:
        raise MoeflowError(f"--prompts must be START:END, got {spec!r}") from None
    if not 0 <= r.start < r.stop <= n:
        raise MoeflowError(f"--prompts {spec} is outside the trace's {n} requests")
    return r


def build(trace: str, out: str, prompts: str | None = None, capacity: int = DEFAULT_CAPACITY,
          semantic: bool = True) -> str:
    from moeflow.bench.cache import build_store, request_embeddings

    reqs = load_requests(trace)
    fit = parse_range(prompts, reqs.requests)
    emb, why = request_embeddings(reqs) if semantic else (None, "--no-semantic")
    store = build_store(reqs, fit, emb, capacity)
    store.save(out)
    sem = f"embeddings: {store.embedder}" if emb is not None else f"no embeddings ({why})"
    return (f"{out}: {len(store)} maps of {store.L} layers x {store.E} experts from requests "
            f"{fit.start}:{fit.stop} of {reqs.name} ({store.seen} after de-duplication); {sem}")


def add_parser(sub) -> None:
    m = sub.add_parser("maps", help="fMoE expert maps (docs/expert-maps.md)")
    msub = m.add_subparsers(dest="maps", required=True)
    b = msub.add_parser("build", help="build an expert-map file from a routing trace")
    b.add_argument("--trace", required=True, help="routing trace (.npz with offsets, or .jsonl)")
    b.add_argument("--out", required=True, help="the .npz to write")
    b.add_argument("--prompts", help="requests START:END to use (default: the first 80%%)")
    b.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="maps kept at most")
    b.add_argument("--no-semantic", action="store_true", help="no prompt embeddings (trajectory hint only)")
    b.set_defaults(func=run)
    c = msub.add_parser("cost", help="host time of the trajectory match per layer (the engine's fmoe path)")
    c.add_argument("--maps", required=True, help="expert-map file (`moeflow maps build`)")
    c.add_argument("--trace", required=True, help="routing trace whose tokens are matched")
    c.add_argument("--tokens", type=int, default=200, help="tokens matched (from the trace's last requests)")
    c.add_argument("--every", type=int, default=2, help="match after every N-th layer (policy fmoe's MATCH_EVERY)")
    c.set_defaults(func=run_cost)


def run(args) -> int:
    print(build(args.trace, args.out, args.prompts, args.capacity, not args.no_semantic))
    return 0


def match_cost(maps: str, trace: str, tokens: int = 200, depth: int = 2, every: int = 1) -> dict:
    """Seconds per layer that fmoe's engine path (maps/predict.py Trajectory) spends matching one token and
    picking the experts of the next layers (after every `every`-th layer), over the trace's last tokens."""
    import time

    import numpy as np

    from moeflow.maps.predict import Predictor, Trajectory
    from moeflow.maps.store import ExpertMapStore

    store, reqs = ExpertMapStore.load(maps), load_requests(trace)
    store.check(reqs.ids.shape[1], reqs.experts, "the trace")
    pred = Predictor(store, depth)
    pred.bound()  # the native match's set-up, as fmoe makes it between requests
    ids = reqs.ids[-tokens:].astype(np.int64)
    w = reqs.weights[-tokens:] if reqs.weights is not None else np.ones(ids.shape, np.float32)
    t0, c0, picked = time.perf_counter(), time.process_time(), 0
    for t in range(len(ids)):
        tr = Trajectory(pred)
        for layer in range(pred.L - 1):
            tr.observe(layer, ids[t, layer], w[t, layer])
            if layer % every == 0:
                picked += len(tr.picks(layer, 0.5))
    n = len(ids) * (pred.L - 1)
    per, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    return {"maps": len(store), "layers": pred.L, "tokens": len(ids), "s_per_layer": per, "cpu_s_per_layer": cpu,
            "picks_per_layer": picked / (len(ids) * (pred.L - 1))}


def run_cost(args) -> int:
    r = match_cost(args.maps, args.trace, args.tokens, every=max(1, args.every))
    print(f"{r['maps']} maps, {r['layers']} layers, {r['tokens']} tokens: {1e6 * r['s_per_layer']:.1f} us per layer "
          f"for the match and the picks ({1e6 * r['cpu_s_per_layer']:.1f} us of CPU; a busy host's wall time is "
          f"longer), {r['picks_per_layer']:.2f} picks per layer, matching after every {args.every} layer(s)")
    return 0
