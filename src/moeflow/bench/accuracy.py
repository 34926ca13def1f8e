"""`moeflow bench model-accuracy`: the timing model (perf/model.py) against a `bench latency` JSON.

Rows that carry predicted figures (bench latency on a GPU host adds them) are compared as they are; rows
without, or every row with --repredict, are predicted here from the run's own budget, policy, measured hit
rate and measured expert costs, with the run's hardware profile (stored in the results) or
the given one. The rows of one configuration (`bench latency --repeat`) are compared by their medians: on a
shared host the same configuration ran up to 2x apart within minutes. The predictions take the host's speed
that a probe found beside each row's decode and prefills against the profile's (perf/probe.py); the same
predictions at the profile's own speed are reported beside them. Target: predictions within 20% of
measurements.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from moeflow import MoeflowError
from moeflow.perf.costs import ExpertCosts

TARGET = 0.20
FIGURES = ("predicted_decode_tps", "predicted_ttft_s", "predicted_decode_tps_at_profile_speed",
           "predicted_ttft_s_at_profile_speed")  # a row's predictions compared by their medians


def accuracy_rows(results: dict, profile, cfg, repredict: bool = False) -> list[dict]:
    """Measured against predicted, per configuration (policy, budget, routing): the medians over its rows
    (`bench latency --repeat`) of the measured figures and of the predictions, each row's own (stored, or
    without them, or with repredict, this moeflow's model on the row's measurements: predict_row). `runs` counts
    the rows; decode_range is the lowest and highest measured decode tok/s."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.get("rows", []):
        if "error" in r or r.get("decode_tps") is None or "hit_rate" not in r:
            continue
        pred = {k: r.get(k) for k in FIGURES + ("predicted_binding",)}
        if pred["predicted_decode_tps"] is None or repredict:
            pred = predict_row(r, cfg, profile, results.get("model", "model"), results.get("new_tokens", 128))
            if "predicted_error" in pred:
                continue
        key = (r["policy"], r["gpu_memory_gib"], r.get("routing", "native"))
        groups.setdefault(key, []).append(r | pred)
    out = []
    for (policy, gib, routing), rs in groups.items():
        def med(k):
            v = [x[k] for x in rs if x.get(k) is not None]
            return statistics.median(v) if v else None
        row = {"policy": policy, "gpu_memory_gib": gib, "routing": routing, "runs": len(rs),
               "decode_range": [min(x["decode_tps"] for x in rs), max(x["decode_tps"] for x in rs)],
               "predicted_binding": statistics.mode(x.get("predicted_binding") for x in rs)} | \
            {k: med(k) for k in ("hit_rate", "decode_tps", "ttft_s") + FIGURES}
        for m, p, err in (("decode_tps", "predicted_decode_tps", "decode_error"),
                          ("ttft_s", "predicted_ttft_s", "ttft_error")):
            for at in ("", "_at_profile_speed"):
                if row[m] and row[p + at]:
                    row[err + at] = row[p + at] / row[m] - 1
        out.append(row)
    return out


def predict_row(r: dict, cfg, profile, name: str, new_tokens: int, dtype_name: str = "bfloat16") -> dict:
    """The timing model's figures for one `bench latency` row, from what the row measured (budget, policy,
    decode hit rate, expert costs, the prompt's hits, experts per layer and shape) and the profile: at the
    host's speed that the row's probe readings beside its decode and beside its prefills found against the
    profile's (perf/probe.py; 1 without readings), and, `*_at_profile_speed`, at the profile's own."""
    from moeflow.perf.model import predict_latency
    from moeflow.perf.probe import host_speed

    costs = ExpertCosts.from_dict(r["costs"]) if r.get("costs") else None
    pf = r.get("prefill") or {}
    budget = r.get("budget", {}).get("gpu_memory") or int(r["gpu_memory_gib"] * 2**30)

    def predict(speed: float):
        return predict_latency(cfg, profile, budget, r["policy"], r["hit_rate"], r.get("ttft_prompt_tokens", 512),
                               new_tokens, name, dtype_name, costs, pf.get("hit_rate"), _used(r, cfg),
                               pf.get("tokens_per_expert") or None, speed,
                               expert_bytes=r.get("budget", {}).get("expert_bytes"))  # quantized: the real size
    speed = {k: host_speed(_reading((r.get("probes") or {}).get(k)), profile.probe_s) for k in ("decode", "ttft")}
    then = predict(1.0)
    if then.error:
        return {"predicted_error": then.error}
    d, t = (predict(speed[k]) if speed[k] != 1.0 else then for k in ("decode", "ttft"))
    return {"predicted_decode_tps": d.decode_tps, "predicted_ttft_s": t.ttft_s, "predicted_binding": d.binding,
            "predicted_bound_tps": d.bound_tps, "profile_source": profile.source,
            "predicted_decode_tps_at_profile_speed": then.decode_tps,
            "predicted_ttft_s_at_profile_speed": then.ttft_s, "host_speed": {k: round(v, 3) for k, v in speed.items()}}


def _reading(v) -> float | None:
    """A probe reading: seconds (older results hold a dict with the host's under "host")."""
    return v.get("host") if isinstance(v, dict) else v


def _used(r: dict, cfg) -> float | None:
    """Experts a layer used in the TTFT prompt: recorded, or from its experts on the CPU and copied (the
    misses) over its miss rate (older results)."""
    pf = r.get("prefill") or {}
    if "experts_per_layer" in pf or not pf.get("hit_rate", 1) < 1:
        return pf.get("experts_per_layer")
    return (pf["cpu_experts"] + pf["copied_experts"]) / (1 - pf["hit_rate"]) / len(cfg.moe_layers)


def load_results(path: str | Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MoeflowError(f"results file {path} does not exist") from None
    except ValueError as e:
        raise MoeflowError(f"{path} is not JSON ({e})") from None
    if not isinstance(d, dict) or "rows" not in d:
        raise MoeflowError(f"{path} is not a `moeflow bench latency` result (no rows)")
    return d


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"timing model vs measurement (target: within {TARGET:.0%}; medians of `runs` rows)")
    # "then": the error of the prediction at the profile's speed, where the row's probes found another
    for col in ("policy", "GiB", "routing", "runs", "hit", "decode tok/s", "range", "predicted", "error", "then",
                "TTFT s", "predicted", "error", "then", "binds"):
        t.add_column(col, justify="left" if col in ("policy", "routing", "binds") else "right")
    for r in rows:
        def err(k):
            v = r.get(k)
            return "-" if v is None else f"[{'green' if abs(v) <= TARGET else 'red'}]{v:+.0%}[/]"
        lo, hi = r.get("decode_range") or (r["decode_tps"], r["decode_tps"])
        t.add_row(r["policy"], f"{r['gpu_memory_gib']:.0f}", r["routing"][:20], str(r.get("runs", 1)),
                  f"{r['hit_rate']:.0%}", f"{r['decode_tps']:.2f}", f"{lo:.1f}-{hi:.1f}",
                  f"{r['predicted_decode_tps']:.2f}", err("decode_error"), err("decode_error_at_profile_speed"),
                  f"{r['ttft_s']:.2f}" if r.get("ttft_s") else "-",
                  f"{r['predicted_ttft_s']:.2f}" if r.get("predicted_ttft_s") else "-", err("ttft_error"),
                  err("ttft_error_at_profile_speed"),
                  r.get("predicted_binding") or "-")
    Console(width=150).print(t)
    for at, said in (("", ""), ("_at_profile_speed", "at the profile's speed: ")):
        dec = [r["decode_error" + at] for r in rows if "decode_error" + at in r]
        timed = [r["ttft_error" + at] for r in rows if "ttft_error" + at in r]
        if dec or not at:
            print(f"{said}decode within {TARGET:.0%}: {sum(abs(e) <= TARGET for e in dec)} of {len(dec)}; "
                  f"TTFT within {TARGET:.0%}: {sum(abs(e) <= TARGET for e in timed)} of {len(timed)}")


def plot(rows: list[dict], path: str | Path, title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeflowError("the plot needs matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (m, p, label) in zip(axes, [("decode_tps", "predicted_decode_tps", "decode tok/s"),
                                        ("ttft_s", "predicted_ttft_s", "TTFT s")]):
        rs = [r for r in rows if r.get(m) and r.get(p)]
        if not rs:
            continue
        then = p + "_at_profile_speed"  # the same prediction at the profile's speed: hollow, where it differs
        hi = max(max(r[m], r[p], r.get(then) or 0) for r in rs) * 1.2
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.fill_between([0, hi], [0, hi * (1 - TARGET)], [0, hi * (1 + TARGET)], color="gray", alpha=0.15,
                        label=f"±{TARGET:.0%}")
        markers = dict(zip(sorted({r["gpu_memory_gib"] for r in rs}), "osD^vP*X"))  # one shape per budget
        for policy in sorted({r["policy"] for r in rs}):
            color = None
            for gib, mk in markers.items():
                mine = [r for r in rs if r["policy"] == policy and r["gpu_memory_gib"] == gib]
                if not mine:
                    continue
                xs, ys = [r[m] for r in mine], [r[p] for r in mine]
                # the measured range of a configuration's repeats (decode): a horizontal bar through its median
                lo_hi = [r.get("decode_range") if m == "decode_tps" else None for r in mine]
                err = [[x - (lh or (x, x))[0] for x, lh in zip(xs, lo_hi)], [(lh or (x, x))[1] - x
                                                                            for x, lh in zip(xs, lo_hi)]]
                bars = ax.errorbar(xs, ys, xerr=err, fmt=mk, color=color, capsize=2,
                                   label=f"{policy}, {gib:g} GiB")
                color = bars.lines[0].get_color()
                other = [r for r in mine if r.get(then) and r[then] != r[p]]
                if other:
                    ax.plot([r[m] for r in other], [r[then] for r in other], mk, mfc="none", color=color,
                            label=f"{policy}, {gib:g} GiB, at the profile's speed")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.legend(fontsize=7, title="bars: measured range of the repeats", title_fontsize=7)
    fig.suptitle(title or "timing model accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
