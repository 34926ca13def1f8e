"""The pipeline engine built from a model spec and a plan: planned and checked first, weights loaded after."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from moeflow.checkpoint import load, model_quant, read_model_config, resolve_device, resolve_dtype
from moeflow.config import ModelConfig
from moeflow.engine.budget import gib
from moeflow.perf.profile import HardwareProfile
from moeflow.perf.throughput_model import (PREFILL_CHUNK, PipelineRates, ThroughputPolicy, ThroughputPrediction,
                                           cpu_attention_shape, predict_throughput)
from moeflow.pipeline.plan import check_fits, choose_plan, host_budget, machine_profile, parse_plan
from moeflow.quant.format import QuantSpec, expert_bytes


@dataclass(frozen=True)
class PipelineSpec:
    model: str
    device: str = "cuda"
    dtype: str = "auto"
    gpu_memory: int | None = None  # bytes; None: no budget (the CPU plays the GPU)
    plan: str | None = None         # "N,mu,r_w,r_c,attn"; None: chosen by the throughput model
    prompt_len: int = 512           # what the plan is chosen and predicted for, and the host KV cache sized for
    gen_len: int = 128
    max_len: int = 1024             # prompt + generated tokens of one sequence at most
    default_n: int = 16             # N on the CPU when neither --plan nor --gpu-memory is given
    max_n: int | None = None        # the chosen plan's N at most
    quant: str | None = None        # --quantize: int4 or int8 experts (a published GPTQ/AWQ checkpoint's own)


def plan_for(spec: PipelineSpec, held: int = 0, cfg: ModelConfig | None = None,
             profile: HardwareProfile | None = None) -> tuple[ThroughputPolicy, ThroughputPrediction]:
    """The plan and its prediction, checked against the GPU budget and the host memory available (held: bytes
    this process already holds for the plan, a store loaded before planning; cfg: the model's, if loaded;
    profile: the hardware's, default machine_profile())."""
    cfg = cfg or read_model_config(spec.model)[1]
    profile, dtype = profile or machine_profile(), resolve_dtype(spec.dtype, cfg, torch.device(spec.device))
    quant = model_quant(spec.model, spec.quant)
    eb = expert_bytes(cfg.expert_intermediate_size, cfg.hidden_size, quant) if quant else None
    b, rates = dtype.itemsize, measured_rates(cfg, spec.device, dtype, spec.gpu_memory, quant)
    if spec.plan:
        pol = parse_plan(spec.plan)
    elif spec.gpu_memory is not None:
        pol = choose_plan(cfg, profile, spec.gpu_memory, spec.prompt_len, spec.gen_len, b, spec.max_n,
                          host_budget(held), rates, eb).policy
    else:
        pol = ThroughputPolicy(spec.default_n, max(1, spec.default_n // 2), 0.0, 0.0, False)
    check_fits(cfg, pol, spec.prompt_len, spec.gen_len, spec.gpu_memory, b, host_budget(held), eb)
    return pol, predict_throughput(cfg, profile, pol, spec.prompt_len, spec.gen_len, b, rates, eb)


def measured_rates(cfg: ModelConfig, device: str, dtype: torch.dtype, gpu_memory: int | None,
                   quant: QuantSpec | None = None) -> PipelineRates:
    """The pipeline's kernels on this host at cfg's shapes, timed once (a GPU run only: on the CPU the planner's
    figures are the profile's): CPU attention's read rate and a call's fixed part, and the prefill's expert calls
    (bf16 grouped GEMMs or the quantized fused kernels, where they run; where one layer's experts fit the GPU
    budget beside the call's buffers)."""
    from moeflow.experts.cpu import physical_cores
    from moeflow.pipeline.attention_bench import measured_call_s, measured_read_bw
    from moeflow.pipeline.weights import measured_grouped_flops

    dev = resolve_device(device)
    if dev.type != "cuda":
        return PipelineRates()
    Hq, Hkv, D, shared = cpu_attention_shape(cfg)
    flops = None
    if dtype == torch.bfloat16:
        flops = measured_grouped_flops(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                                       cfg.expert_intermediate_size, PREFILL_CHUNK, str(dev), gpu_memory, quant)
    cores = physical_cores()
    return PipelineRates(measured_read_bw(Hq, Hkv, D, cores, shared), measured_call_s(Hq, Hkv, D, cores), flops)


def describe(pred: ThroughputPrediction) -> str:
    p = pred.policy
    return (f"plan N={p.N} mu={p.mu} r_w={p.r_w:.2f} r_c={p.r_c:.2f} attention={'gpu' if p.attn_gpu else 'cpu'}: "
            f"predicted {pred.tokens_per_s:.1f} tok/s end to end, {pred.decode_tps:.1f} decode ({pred.binding} "
            f"binds); GPU {gib(pred.gpu_bytes)}, host {gib(pred.host_bytes)}")


def load_pipeline(spec: PipelineSpec, quiet: bool = False):
    """(PipelineEngine, its prediction): the plan printed and checked before the weights load."""
    from moeflow.pipeline.engine import PipelineEngine

    profile = machine_profile()
    pol, pred = plan_for(spec, profile=profile)
    if not quiet:  # which host the figures are: the reference one until `moeflow profile` has measured this one
        print(f"moeflow: {describe(pred)}; profile: {profile.source or profile.device_name}", file=sys.stderr)
    device = resolve_device(spec.device)
    ck = load(spec.model, device=device, dtype=spec.dtype, expert_device="cpu", progress=None, quant=spec.quant)
    if device.type == "cuda":
        ck.store.pin()
        torch.cuda.reset_peak_memory_stats(device)
    return PipelineEngine(ck, pol, spec.max_len, kv_positions=kv_positions(spec, pol),
                          gpu_memory=spec.gpu_memory), pred


def kv_positions(spec: PipelineSpec, pol: ThroughputPolicy) -> int:
    """The host KV cache the plan counted: N runs of prompt_len + gen_len positions."""
    return pol.N * (spec.prompt_len + spec.gen_len)
