"""The throughput model's pipeline terms by hand: CPU attention at its measured rate beside the copies, copies
at the shared rate while it reads, the last micro-batch's chain, prefill at the GPU's measured expert rate.

tiny-mixtral: H 256, I 512, E 8, K 2, 8 heads, 4 KV heads, D 32, 4 layers; N 4 in micro-batches of 2, prompt 96
+ 64 generated: average context 128.
"""

from __future__ import annotations

import pytest

from moeflow.checkpoint import read_model_config
from moeflow.perf.throughput_model import (PipelineRates, ThroughputPolicy, copy_beside, predict_throughput,
                                           shared_rates)
from moeflow.perf.profile import HardwareProfile

TINY = read_model_config("synthetic:tiny-mixtral")[1]
W_E = 8 * 3 * 256 * 512 * 2        # one layer's experts, bytes
KV_READ = 4 * 128 * 2 * 4 * 32 * 2  # 4 sequences' K and V of one layer
POL = ThroughputPolicy(N=4, mu=2, r_w=0.0, r_c=0.0, attn_gpu=False)


def profile(**kw) -> HardwareProfile:
    base = dict(host="toy", cpu_model="toy", cpu_threads=1, host_memory=1 << 40, cpu_read_bw=1e9, cpu_flops=1e15,
                gpu_name="toy-gpu", gpu_memory=80 << 30, gpu_bw=1e12, gpu_flops=1e15, h2d_bw=1e9, d2h_bw=1e9)
    return HardwareProfile(**(base | kw))


def test_copies_slow_down_only_while_the_cpu_reads():
    assert copy_beside(10.0, alone=2.0, beside=1.0, overlap_s=4.0) == pytest.approx(4.0 + 6.0 / 2.0)
    assert copy_beside(3.0, alone=2.0, beside=1.0, overlap_s=4.0) == pytest.approx(3.0)
    # measured together: 1.5 GB/s, of which the copies took 0.6: the CPU reads at 0.9
    p = profile(host_read_bw_shared=1.5e9, h2d_bw_shared=0.6e9)
    assert shared_rates(p) == pytest.approx((0.9e9, 0.6e9))
    t = predict_throughput(TINY, p, POL, 96, 64)
    cpu = KV_READ / 0.9e9
    assert t.terms["CPU memory bus"] == pytest.approx(cpu)
    h2d = W_E + 4 * 8 * 32 * 2  # experts, attention outputs back
    assert t.terms["PCIe"] == pytest.approx(cpu + (h2d - 0.6e9 * cpu) / 1e9)
    assert shared_rates(profile()) == (1e9, 1e9)  # not measured: each alone


def test_cpu_attention_at_the_kernels_rate_and_the_last_micro_batch_after_it():
    p = profile(cpu_read_bw=1e12, h2d_bw=1e12, gpu_bw=2e7)  # the GPU takes about what the CPU does
    slow = predict_throughput(TINY, p, POL, 96, 64, rates=PipelineRates(attn_bw=1e6))
    assert slow.terms["CPU memory bus"] == pytest.approx(KV_READ / 1e6)
    assert slow.layer_s == pytest.approx(slow.terms["CPU memory bus"] + slow.terms["GPU"] / 2)
    assert slow.layer_s > max(slow.terms.values())
    fast = predict_throughput(TINY, p, POL, 96, 64, rates=PipelineRates(attn_bw=1e15))  # never above the bus
    assert fast.terms["CPU memory bus"] == pytest.approx(KV_READ / 1e12)
    assert slow.decode_tps < fast.decode_tps


def test_prefill_takes_the_gpus_measured_expert_rate():
    p = profile(gpu_flops=1e12, gpu_bw=1e15, h2d_bw=1e15, d2h_bw=1e15)
    rate = 0.25e12  # the expert at 64 tokens: a quarter of the matmul rate
    timed = {"256x512:bfloat16": {"tokens": [1, 64], "gpu_s": [1.0, 6 * 256 * 512 * 64 / rate]}}
    peak = predict_throughput(TINY, p, POL, 96, 64).prefill_s
    measured = predict_throughput(TINY, HardwareProfile(**(p.__dict__ | {"experts": timed})), POL, 96, 64).prefill_s
    experts = 4 * 4 * 96 * 6 * 2 * 256 * 512  # 4 layers, 4 x 96 tokens, K = 2
    assert measured - peak == pytest.approx(experts / rate - experts / 1e12, rel=1e-3)


def test_each_micro_batch_pays_the_attention_calls_fixed_part():
    """A call's fixed part (attn_call_s) per micro-batch on the CPU's attention: N = 4 in 2 micro-batches pays it
    twice, in 4 four times; with a large fixed part the planner takes fewer, larger micro-batches than without."""
    from dataclasses import replace

    from moeflow.pipeline.plan import choose_plan

    p = profile()
    base = predict_throughput(TINY, p, POL, 96, 64)
    for pol, n_mb in ((POL, 2), (replace(POL, mu=1), 4)):
        t = predict_throughput(TINY, p, pol, 96, 64, rates=PipelineRates(attn_call_s=1e-3))
        assert t.terms["CPU memory bus"] == pytest.approx(base.terms["CPU memory bus"] + n_mb * 1e-3)
    free = choose_plan(TINY, p, 8 << 30, 96, 64, max_n=64, host=1 << 40)
    costly = choose_plan(TINY, p, 8 << 30, 96, 64, max_n=64, host=1 << 40, rates=PipelineRates(attn_call_s=1.0))
    assert -(-costly.policy.N // costly.policy.mu) < -(-free.policy.N // free.policy.mu)


def test_prefill_at_the_grouped_calls_measured_rate_reads_no_expert_twice():
    """A measured grouped-call rate (prefill_flops) includes the calls' weight reads: prefill then prices the
    experts at that rate and reads only the dense weights per pass."""
    p = profile(gpu_flops=1e12, gpu_bw=1e9, h2d_bw=1e15, d2h_bw=1e15)
    rate = 0.5e12
    got = predict_throughput(TINY, p, POL, 96, 64, rates=PipelineRates(prefill_flops=rate)).prefill_s
    peak = predict_throughput(TINY, p, POL, 96, 64).prefill_s  # experts at the matmul rate, each read per pass
    tokens, flops = 4 * 96, 6 * 2 * 256 * 512  # 4 sequences of 96; K = 2, H 256, I 512
    experts_read = 8 * 3 * 256 * 512 * 2  # all 8 experts of a layer, once per pass (one pass here)
    per_layer = tokens * flops / rate - tokens * flops / 1e12 - experts_read / 1e9
    assert got - peak == pytest.approx(4 * per_layer, rel=1e-6)


def test_latent_attention_moves_and_reads_its_latent_rows():
    """DeepSeek's MLA on the CPU: each sequence sends its absorbed query (Hq rows of R + Dr) and one cache row,
    gets Hq rows back, and reads one arena row of R + Dr per position (keys and values alike)."""
    cfg = read_model_config("synthetic:tiny-deepseek-v2")[1]
    Hq, row = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    mla = ThroughputPolicy(N=4, mu=2, r_w=1.0, r_c=0.0, attn_gpu=False)
    t = predict_throughput(cfg, profile(d2h_bw=1.0, cpu_read_bw=1e15), mla, 96, 64)
    assert t.terms["PCIe"] == pytest.approx(4 * (Hq + 1) * row * 2 / 1.0)
    t = predict_throughput(cfg, profile(cpu_read_bw=1.0), mla, 96, 64)
    assert t.terms["CPU memory bus"] == pytest.approx(4 * 128 * row * 2 / 1.0)  # 4 sequences of 128 positions


def test_sliding_windows_cut_what_the_cpu_attention_reads():
    """A model whose every other layer attends to its last 8 positions (GPT-OSS's layout) reads, per layer on
    average, half of the 128-position context plus half of 8."""
    from dataclasses import replace

    windowed = replace(TINY, layer_windows=(8, None, 8, None))
    t, w = (predict_throughput(c, profile(cpu_read_bw=1.0), POL, 96, 64) for c in (TINY, windowed))
    assert w.terms["CPU memory bus"] == pytest.approx(t.terms["CPU memory bus"] * (8 + 128) / 2 / 128)
