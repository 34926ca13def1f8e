"""Where a host-bound decode layer's time goes: a model of the given shapes at two depths, every expert in a
GPU slot, timed in turns (the slope per layer, as perf/layers.py time_resident_layer), with variants of what
the profile's resident layer leaves out: the model's full expert count (the profile builds K per layer), a
deeper span, and policy lru in place of gpu. Each variant prints the slope and, per layer, the expert
backend's host timers (sync, plan, launch) of the deeper model, beside the speed probe's host reading.

On the H200 host (2026-12-02 17:16) Qwen3's lru decode at 100% hits took 0.46 ms a layer where the profile's
resident Qwen3 layer took 0.354 at the same probe reading. Usage:
  python scripts/probes/resident_probe.py synthetic:qwen3-30b-a3b [--variants 'E FEW MANY POLICY,...']
"""

from __future__ import annotations

import argparse

import torch

from moeflow.checkpoint import read_model_config
from moeflow.engine.sequence import SamplingParams
from moeflow.perf.costs import device_sync, paired_s
from moeflow.perf.layers import _close, _steps, resident_engine
from moeflow.perf.probe import SpeedProbe

TIMERS = ("sync_s", "plan_s", "launch_s", "backend_s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--variants", default="")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    cfg = read_model_config(a.model)[1]
    K, E = cfg.num_experts_per_tok, cfg.num_experts
    variants = [v.split() for v in a.variants.split(",")] if a.variants else \
        [[str(K), "2", "6", "gpu"], [str(E), "2", "6", "gpu"], [str(K), "2", "12", "gpu"], [str(E), "2", "6", "lru"]]
    dev = torch.device("cuda")
    sync = device_sync(dev)
    probe = SpeedProbe(dev)
    decode = a.steps * (a.repeats + 1) * 2 + 4
    print(f"{a.model}: K={K} of E={E}; {a.steps} steps x {a.repeats} in turns", flush=True)
    for e, few, many, policy in variants:
        e, few, many = int(e), int(few), int(many)
        host = probe()
        engines = []
        try:
            engines += [resident_engine(cfg, dev, torch.bfloat16, n, e, decode + 16, policy) for n in (few, many)]
            for eng in engines:
                eng.add_request(list(range(3, 11)), SamplingParams(max_new_tokens=decode, ignore_eos=True))
                eng.step()
            t_few, t_many = paired_s(_steps(engines[0], a.steps), _steps(engines[1], a.steps), a.repeats, sync)
            s0 = engines[1].expert_stats()
            _steps(engines[1], a.steps)()
            sync()
            s1 = engines[1].expert_stats()
            per = {k[:-2]: (s1[k] - s0[k]) / a.steps / many * 1e3 for k in TIMERS}
            slope = (t_many - t_few) / a.steps / (many - few) * 1e3
            print(f"E={e:4d} layers {few}->{many} {policy:4s}: {slope:.3f} ms/layer (step {t_many / a.steps * 1e3:.2f} "
                  f"ms at {many}); per layer " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) +
                  f"; probe host {host * 1e3:.3f} -> {probe() * 1e3:.3f} ms", flush=True)
        finally:
            _close(engines, dev)
    probe.close()


if __name__ == "__main__":
    main()
