"""`moeflow plan --gpus N`: one rank's share predicted as a one-GPU model, plus the collectives.

A rank holds ceil(E / N) experts of each layer and, with routing spread evenly, runs ceil(K / N) of a token's
K experts (a token whose experts fall unevenly makes one rank slower: not counted, so the prediction is
optimistic); its CPU experts run on 1/N of the cores and share the host's memory
bus, so the profile's CPU figures are divided by N; each GPU has its own budget and PCIe link. Every decoder
layer adds two all-reduces of one hidden vector (after attention and after the FFN block): the measured time
where `moeflow plan --gpus N --measure` ran them on this host, else ALL_REDUCE_S. The dense layers' time is
kept whole (a decode step's small matrices are bound by launches, not by the bytes the split saves).
"""

from __future__ import annotations

from dataclasses import replace

from moeflow.config import ModelConfig
from moeflow.perf.layers import layer_key
from moeflow.perf.model import LatencyPrediction
from moeflow.perf.profile import HardwareProfile

ALL_REDUCE_S = 20e-6  # modeled: NCCL's small all-reduce between GPUs of one host is latency-bound (~10-30 us)


def rank_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The model as one rank sees it: its experts per layer and per token."""
    return replace(cfg, num_experts=-(-cfg.num_experts // world),
                   num_experts_per_tok=-(-cfg.num_experts_per_tok // world))


def rank_profile(profile: HardwareProfile, cfg: ModelConfig, world: int, dtype_name: str = "bfloat16"
                 ) -> HardwareProfile:
    """The host as one rank sees it: 1/N of the cores and of the CPU memory bus; its own GPU and link."""
    experts = {k: v | {"cpu_s": [t * world for t in v["cpu_s"]]} for k, v in profile.experts.items()}
    layers = dict(profile.resident_layers)
    full = layer_key(cfg, dtype_name)
    if full in layers:
        layers[layer_key(rank_config(cfg, world), dtype_name)] = layers[full]
    return replace(profile, cpu_read_bw=profile.cpu_read_bw / world, cpu_flops=profile.cpu_flops / world,
                   cpu_threads=max(profile.cpu_threads // world, 1),
                   host_read_bw_shared=profile.host_read_bw_shared / world, experts=experts,
                   resident_layers=layers)


def with_collectives(p: LatencyPrediction, layers: int, all_reduce_s: float) -> LatencyPrediction:
    """A rank's prediction with two all-reduces per decoder layer added to each decode token."""
    if p.error or not p.decode_tps:
        return p
    extra = 2 * layers * all_reduce_s
    token = replace(p.token, overhead=p.token.overhead + extra, total=p.token.total + extra)
    return replace(p, decode_tps=1 / (1 / p.decode_tps + extra), token=token)


def per_rank(cfg: ModelConfig, profile: HardwareProfile, world: int, placement: bool, workload: str
             ) -> tuple[ModelConfig, HardwareProfile, float, str]:
    """cmd_plan's inputs for one of `world` ranks, the all-reduce's seconds and what they came from."""
    from moeflow import MoeflowError

    if placement:
        raise MoeflowError("plan --gpus models routing spread evenly: not with --placement yet")
    if workload != "latency":
        raise MoeflowError("plan --gpus models the latency regime only: add --workload latency")
    seconds, said = measured_all_reduce(world, cfg.hidden_size)
    return rank_config(cfg, world), rank_profile(profile, cfg, world), seconds, said


def measured_all_reduce(world: int, hidden: int) -> tuple[float, str]:
    """One all-reduce of a hidden vector (bf16) over `world` GPUs of this host, timed there; modeled where the
    host has fewer GPUs."""
    import tempfile
    from functools import partial
    from pathlib import Path

    import torch

    from moeflow.dist.launch import DistConfig, launch

    if torch.cuda.device_count() < world:
        return ALL_REDUCE_S, f"modeled ({ALL_REDUCE_S * 1e6:.0f} us; this host has fewer than {world} GPUs)"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds"
        launch(partial(_time_all_reduce, hidden, out), DistConfig(world, "cuda", timeout_s=60))
        seconds = float(out.read_text())
    return seconds, f"measured on this host's {world} GPUs ({seconds * 1e6:.1f} us)"


def _time_all_reduce(hidden: int, out, ranks) -> None:
    from moeflow.dist.groups import all_reduce_seconds

    seconds = all_reduce_seconds(ranks, hidden)
    if ranks.leader:
        out.write_text(repr(seconds))


def plan_with_collectives(plan, cfg: ModelConfig, all_reduce_s: float):
    """A LatencyPlan's predictions with the collectives added; the fastest policy chosen again."""
    preds = {k: with_collectives(p, cfg.num_hidden_layers, all_reduce_s) for k, p in plan.predictions.items()}
    ok = [p for p in preds.values() if p.error is None]
    return replace(plan, predictions=preds, policy=max(ok, key=lambda p: p.decode_tps).policy)
