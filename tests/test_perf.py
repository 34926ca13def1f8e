"""The performance model: hardware profile and its cache, roofline, timing models, search, `moeflow plan`.
Hand-made profiles with hand-computed answers; no GPU, seconds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import read_model_config
from moeflow.cli import main
from moeflow.perf import costs as costs_mod
from moeflow.perf.costs import ExpertCosts, fixed_part, grouped_passes, paired_s
from moeflow.perf.model import layer_time, predict_latency
from moeflow.perf.throughput_model import ThroughputPolicy, predict_throughput, throughput_memory
from moeflow.perf.profile import HardwareProfile, reference_profile
from moeflow.perf.roofline import attainable, expert_ffn
from moeflow.perf.search import copy_threshold, search_latency, search_throughput
from moeflow.policy import get_policy

GiB = 1 << 30
MIXTRAL = read_model_config("synthetic:mixtral-8x7b")[1]
QWEN = read_model_config("synthetic:qwen3-30b-a3b")[1]
TINY = read_model_config("synthetic:tiny-mixtral")[1]
MS = 1e-3


pytestmark = pytest.mark.usefixtures("cache")  # conftest's: a fresh profile cache per test


def flat_costs(cpu=10 * MS, copy=2 * MS, gpu=1 * MS) -> ExpertCosts:
    pts = (1, 4, 16, 64, 256)
    return ExpertCosts(pts, (cpu,) * 5, (gpu,) * 5, copy)


def toy_profile(**kw) -> HardwareProfile:
    base = dict(host="toy", cpu_model="toy", cpu_threads=1, host_memory=1 << 40, cpu_read_bw=1e9, cpu_flops=1e12,
                gpu_name="toy-gpu", gpu_memory=80 * GiB, gpu_bw=1e12, gpu_flops=1e15, h2d_bw=1e9, d2h_bw=1e9)
    return HardwareProfile(**(base | kw))


# -- latency regime: one layer, by hand -------------------------------------------------------------------
def test_layer_link_bound():
    # lru copies both misses: copy 2 ms each after 0.5 ms of attention, then one wave computes both (1 ms each,
    # of which 0.4 is the wave's fixed part: paid once).
    costs = replace(flat_costs(), gpu_fixed_s=0.4 * MS)
    t = layer_time(get_policy("lru"), costs, 512, {0: 1, 1: 1}, [], 8, 0.5 * MS, 0.1 * MS)
    assert t.copy == pytest.approx(4 * MS) and t.cpu == 0
    assert t.total == pytest.approx((0.5 + 4 + 0.4 + 2 * 0.6 + 0.1) * MS)
    # one slot for copies: the first is computed (a wave of its own) before the second copy can reuse it
    one = layer_time(get_policy("lru"), costs, 512, {0: 1, 1: 1}, [], 1, 0.5 * MS, 0.1 * MS)
    assert one.total == pytest.approx((0.5 + 4 + 1 + 0.1) * MS) and one.gpu == pytest.approx((0.5 + 2) * MS)


def test_a_waves_fixed_part_from_the_expert_bytes():
    # 1 ms for an expert alone, 0.6 of it reading 0.6 GB at 1 TB/s: the other 0.4 is the wave's launches
    c = flat_costs().with_rates(600_000_000, 1e12)
    assert c.gpu_fixed_s == pytest.approx(0.4 * MS)
    assert c.gpu_wave([(1, 1.0)] * 8) == pytest.approx((0.4 + 8 * 0.6) * MS) and c.gpu_wave([]) == 0.0
    assert replace(c, gpu_fixed_s=0.1 * MS).with_rates(1, 1e12).gpu_fixed_s == 0.1 * MS  # measured: kept


def test_layer_cpu_bound():
    t = layer_time(get_policy("fiddler"), flat_costs(), 512, {0: 1, 1: 1}, [1], 8, 0.5 * MS, 0.1 * MS)
    assert t.cpu == pytest.approx(20 * MS) and t.copy == 0
    assert t.total == pytest.approx((0.5 + 20 + 0.1) * MS)


def test_layer_gpu_bound():
    t = layer_time(get_policy("gpu"), flat_costs(), 512, {}, [1, 1], 8, 0.5 * MS, 0.1 * MS)
    assert t.gpu == pytest.approx(2.5 * MS) and t.total == pytest.approx(2.6 * MS)


def test_a_cpu_call_pays_its_fixed_part_once():
    # 1 ms for an expert alone, of which 0.6 is the call's fixed part: three in one call take 0.6 + 3 x 0.4
    costs = replace(flat_costs(cpu=1 * MS), cpu_fixed_s=0.6 * MS, cpu_call_s=0.05 * MS)
    assert costs.cpu_each(1) == pytest.approx(0.4 * MS) and costs.cpu_call() == pytest.approx(0.65 * MS)
    t = layer_time(get_policy("fiddler"), costs, 512, {0: 1, 1: 1, 2: 1}, [], 8, 0.5 * MS, 0.1 * MS)
    assert t.cpu == pytest.approx((0.65 + 1.2) * MS) and t.total == pytest.approx((0.5 + 1.85 + 0.1) * MS)
    assert costs.scaled(2.0).cpu_fixed_s == pytest.approx(1.2 * MS)  # a correction scales both parts
    assert fixed_part(1.0, 0.6 + 4 * 0.4, 4) == pytest.approx(0.6)  # t1 = c + e, t4 = c + 4e
    assert fixed_part(1.0, 5.0, 4) == 0.0 and fixed_part(1.0, 0.5, 4) == 1.0  # clamped to [0, t1]


def test_the_cpu_reads_faster_in_a_layer_that_copies_nothing():
    # CPU 10 ms per expert beside copies, 8 ms alone (cpu_alone 0.8); copy + GPU 3 ms
    costs = replace(flat_costs(), cpu_alone=0.8)
    fiddler = layer_time(get_policy("fiddler"), costs, 512, {0: 1}, [], 8, 0.0, 0.0)  # one miss: CPU, no copy
    assert fiddler.copy == 0 and fiddler.cpu == pytest.approx(8 * MS)
    auto = layer_time(get_policy("auto"), costs, 512, {0: 1, 1: 1}, [], 8, 0.0, 0.0)  # copies: CPU beside them
    on_cpu = sum(get_policy("auto").plan({0: 1, 1: 1}, costs, 512, 8).values()) / 512  # experts' worth
    assert auto.copy > 0 and auto.cpu == pytest.approx(on_cpu * 10 * MS)
    assert costs.cpu_work([], False) == 0.0


def test_only_the_experts_own_part_reads_faster_alone():
    # Qwen3-like: 0.56 ms per expert beside copies, 0.42 alone (cpu_alone 0.75), of which 0.32 is the call's
    # fixed part, which reads no weights: six experts alone take 0.32 + 6 x 0.10, not 0.75 x (0.32 + 6 x 0.24)
    costs = replace(flat_costs(cpu=0.56 * MS), cpu_fixed_s=0.32 * MS, cpu_alone=0.75)
    jobs = [(1, 1.0)] * 6
    assert costs.cpu_work(jobs, False) == pytest.approx((0.32 + 6 * 0.10) * MS)
    assert costs.cpu_work(jobs, True) == pytest.approx((0.32 + 6 * 0.24) * MS)
    assert costs.cpu_work([(1, 0.5)], False) == pytest.approx((0.32 + 0.05) * MS)  # half the rows


def test_paired_timing_takes_turns(monkeypatch):
    """The one-expert and m-expert calls are timed in turns, so a machine that slows down midway slows both."""
    clock, calls = [0.0], []
    monkeypatch.setattr(costs_mod.time, "perf_counter", lambda: clock[0])

    def work(name, s):
        def fn():
            calls.append(name)
            clock[0] += s * (3 if len(calls) > 6 else 1)  # the machine gets 3x slower after 6 calls
        return fn

    ta, tb = paired_s(work("a", 1.0), work("b", 1.6), 5)
    assert calls == ["a", "b"] * 6                    # a warm-up of each, then turns
    assert tb / ta == pytest.approx(1.6)              # medians of calls from the same half
    assert fixed_part(ta, tb, 2) == pytest.approx(0.4 * ta)


def test_auto_balances_cpu_and_copy():
    # Two misses, CPU 10 ms, copy+GPU 3 ms each: auto splits one expert so both paths end together.
    costs = flat_costs()
    t = layer_time(get_policy("auto"), costs, 512, {0: 1, 1: 1}, [], 8, 0.0, 0.0)
    assert t.total < 6 * MS  # better than copying both (2+2+1 plus waits) or computing both on the CPU (20)
    assert t.cpu > 0 and t.copy > 0


def test_the_hosts_prefill_time_runs_beside_neither_the_cpu_nor_the_copies():
    # A prefill layer whose host spends 4 ms beyond the overhead: in series with the CPU's share (the host
    # waits for it before it launches the rest) and with the copies (measured so on the H200 host).
    costs = flat_costs(cpu=10 * MS, copy=2 * MS, gpu=1 * MS)
    lru = layer_time(get_policy("lru"), costs, 512, {0: 100, 1: 100}, [], 8, 0.0, 0.5 * MS, tokens=512)
    assert lru.total == pytest.approx((2 + 2 + 1 + 1 + 0.5) * MS)  # both copies, then the wave of the two
    lru_host = layer_time(get_policy("lru"), costs, 512, {0: 100, 1: 100}, [], 8, 0.0, 0.5 * MS, tokens=512,
                          host_s=4 * MS)
    assert lru_host.total == pytest.approx(lru.total + 4 * MS)
    cpu = layer_time(get_policy("cpu"), costs, 512, {0: 1}, [], 8, 0.0, 0.5 * MS, tokens=512, host_s=4 * MS)
    assert cpu.total == pytest.approx((10 + 4 + 0.5) * MS)
    # launching each copy takes the host 5 ms: four copies (8 ms on the copy engine) take it 20 ms, beside them
    slow = replace(costs, copy_launch_s=5 * MS)
    many = layer_time(get_policy("lru"), slow, 512, {e: 100 for e in range(4)}, [], 8, 0.0, 0.5 * MS, tokens=512,
                      host_s=4 * MS)
    assert many.total == pytest.approx((20 + 4 + 0.5) * MS)


def test_copies_cross_at_their_own_rate_with_no_cpu_work_beside_them():
    costs = replace(flat_costs(cpu=10 * MS, copy=2 * MS, gpu=1 * MS), copy_alone_s=1 * MS)
    assert costs.copy() == 2 * MS and costs.copy(alone=True) == 1 * MS and costs.copy(0.5, alone=True) == 0.5 * MS
    lru = layer_time(get_policy("lru"), costs, 512, {0: 100, 1: 100}, [], 8, 0.0, 0.0, tokens=512)
    assert lru.copy == pytest.approx(2 * MS)  # two copies alone
    # fiddler: the 1-token expert on the CPU, the 100-token one copied beside it
    fid = layer_time(get_policy("fiddler"), costs, 512, {0: 1, 1: 100}, [], 8, 0.0, 0.0, tokens=512)
    assert fid.copy == pytest.approx(2 * MS)
    # not measured: the bytes at the link's rate (at most the copy beside the CPU)
    est = flat_costs(copy=2 * MS).with_rates(1_000_000, 1e12, h2d_bw=1e9)
    assert est.copy_alone_s == pytest.approx(1 * MS)
    assert flat_costs(copy=2 * MS).with_rates(5_000_000, 1e12, h2d_bw=1e9).copy_alone_s == 2 * MS


def test_a_cpu_calls_fixed_part_leaves_each_expert_the_time_to_read_its_weights():
    # 10 ms alone, 8 of them the call's fixed part: 2 ms for 5 MB is 2.5 GB/s, where the host reads 1 GB/s
    c = replace(flat_costs(cpu=10 * MS), cpu_fixed_s=8 * MS).with_rates(5_000_000, 1e12, cpu_read_bw=1e9)
    assert c.cpu_fixed_s == pytest.approx(5 * MS) and c.cpu_each(1) == pytest.approx(5 * MS)
    kept = replace(flat_costs(cpu=10 * MS), cpu_fixed_s=4 * MS).with_rates(5_000_000, 1e12, cpu_read_bw=1e9)
    assert kept.cpu_fixed_s == 4 * MS  # 6 ms of its own: slower than reading, nothing to correct
    assert kept.with_rates(5_000_000, 1e12, cpu_read_bw=1e9) == kept


def test_prefill_host_time_between_the_prompts_measured():
    from moeflow.perf.model import prefill_host_s

    p = toy_profile(layer_overhead_s=1 * MS, prefill_overhead_s=(3 * MS, 7 * MS))  # at 32 and 512 tokens
    assert prefill_host_s(p, 1) == 0.0 and prefill_host_s(toy_profile(), 512) == 0.0  # decode; not measured
    assert prefill_host_s(p, 32) == pytest.approx(2 * MS) and prefill_host_s(p, 512) == pytest.approx(6 * MS)
    assert prefill_host_s(p, 272) == pytest.approx(4 * MS)    # halfway from 32 to 512
    assert prefill_host_s(p, 992) == pytest.approx(10 * MS)   # the last piece extended
    assert prefill_host_s(p, 16.5) == pytest.approx(1 * MS)   # halfway from 1 to 32
    assert prefill_host_s(p, 128, top_k=8) == prefill_host_s(p, 512)  # as many routing entries (512 x 2)
    three = replace(p, prefill_tokens=(32, 512, 2048), prefill_overhead_s=(3 * MS, 7 * MS, 8 * MS))
    assert prefill_host_s(three, 512, top_k=8) == pytest.approx(7 * MS)  # measured at 2048 x 2 entries
    assert prefill_host_s(three, 1280) == pytest.approx(6.5 * MS)       # halfway from 512 to 2048
    slow = predict_latency(TINY, p, 1 * GiB, "cpu", None, 512, 16, costs=flat_costs())
    fast = predict_latency(TINY, replace(p, prefill_overhead_s=()), 1 * GiB, "cpu", None, 512, 16, costs=flat_costs())
    assert slow.ttft_s - fast.ttft_s == pytest.approx(4 * 6 * MS, rel=1e-6)  # 4 layers, all with CPU work
    assert slow.decode_tps == fast.decode_tps


def test_the_prompt_shape_spreads_the_prefill_tokens(monkeypatch):
    """A measured prompt shape (tokens per expert, most used first, averaged over layers) replaces the even
    spread: fiddler then sends the experts left with few tokens to the CPU."""
    import moeflow.perf.model as model

    seen = []
    real = model.layer_time
    monkeypatch.setattr(model, "layer_time", lambda pol, costs, inter, misses, *a, **k:
                        seen.append((sorted(misses.values()), k.get("tokens", a[5] if len(a) > 5 else 1)))
                        or real(pol, costs, inter, misses, *a, **k))
    p, costs = toy_profile(), flat_costs()

    def prefill_misses(shape, used=None):
        seen.clear()
        pred = predict_latency(TINY, p, 1 * GiB, "fiddler", 0.0, 64, 16, costs=costs, prefill_hit=0.0,
                               prefill_shape=shape, prefill_used=used)
        return pred, {tuple(m) for m, tokens in seen if tokens == 64}

    even, even_misses = prefill_misses(None)
    assert even_misses == {(16,) * 8}                     # 64 tokens x 2 experts over 8
    same, same_misses = prefill_misses([8.0] * 8)        # an even shape (scaled to the prompt): the same
    assert same_misses == even_misses and same.ttft_s == even.ttft_s
    skewed, skewed_misses = prefill_misses([20.0, 20.0, 20.0, 2.0, 2.0])
    assert skewed_misses == {(4, 4, 40, 40, 40)}
    on_cpu = get_policy("fiddler").plan({0: 40, 1: 40, 2: 40, 3: 4, 4: 4}, costs, 512, 8)
    assert sorted(on_cpu.values()) == [0, 0, 0, 512, 512] and skewed.ttft_s != even.ttft_s
    # averaged over layers, the ranks past the experts a layer used hold fractions (an expert 7th in some
    # layers only): the measured experts per layer take the prompt's tokens, not the tail rounded up
    tail = [20.0, 20.0, 20.0, 2.0, 2.0, 0.6, 0.6, 0.6]
    assert [len(m) for m in prefill_misses(tail)[1]] == [8]          # three experts too many
    assert prefill_misses(tail, used=5)[1] == skewed_misses == {(4, 4, 40, 40, 40)}


def test_predict_latency_cpu_policy_by_hand():
    # policy cpu: every one of the K=2 experts of each of the 4 layers on the CPU at 10 ms; overhead 1 ms/layer;
    # the GPU's part is its weights over 1 TB/s.
    p = toy_profile(layer_overhead_s=1 * MS)
    costs = flat_costs()
    pred = predict_latency(TINY, p, 1 * GiB, "cpu", None, 16, 16, costs=costs)
    dense = sum(TINY.layer_dense_numel(i) * 2 + 2 * 4 * 32 * 2 * 24 for i in range(4)) / 1e12
    head = TINY.vocab_size * TINY.hidden_size * 2 / 1e12
    want = 4 * (20 * MS + 1 * MS) + dense + head
    assert pred.token.total == pytest.approx(want, rel=1e-6)
    assert pred.decode_tps == pytest.approx(1 / want, rel=1e-6)
    assert pred.binding == "CPU memory bus"


def test_bound_takes_the_shared_host_rate_where_measured():
    """The bound's missed bytes cross host memory at the rate CPU reads and copies get together: with that
    rate at half the sum of the separate ones, the miss part of a token's bound doubles."""
    p = toy_profile()
    apart = predict_latency(TINY, p, 1 * GiB, "cpu", 0.0, 16, 16, costs=flat_costs())
    shared = predict_latency(TINY, replace(p, host_read_bw_shared=(p.cpu_read_bw + p.h2d_bw) / 2), 1 * GiB, "cpu",
                             0.0, 16, 16, costs=flat_costs())
    miss = 4 * 2 * TINY.expert_numel * 2 / (p.cpu_read_bw + p.h2d_bw)  # all 4 layers' 2 experts missed
    assert 1 / shared.bound_tps - 1 / apart.bound_tps == pytest.approx(miss, rel=1e-6)
    assert shared.decode_tps == apart.decode_tps  # the timing comes from the costs, not the bound


# -- throughput regime, by hand -----------------------------------------------------------------------------
# tiny-mixtral: H 256, I 512, E 8, K 2, 8 heads, 4 KV heads, D 32, 4 layers; N 4 in micro-batches of 2,
# prompt 96 + 64 generated: average context 128.
W_E = 8 * 3 * 256 * 512 * 2  # one layer's experts, bytes


def test_throughput_link_bound():
    pol = ThroughputPolicy(N=4, mu=2, r_w=0.0, r_c=0.0, attn_gpu=False)
    t = predict_throughput(TINY, toy_profile(), pol, 96, 64)
    assert t.terms["PCIe"] == pytest.approx((W_E + 4 * 8 * 32 * 2) / 1e9)  # experts + attention outputs back
    assert t.binding == "PCIe" and t.layer_s == t.terms["PCIe"]


def test_throughput_cpu_bound():
    pol = ThroughputPolicy(N=4, mu=2, r_w=0.0, r_c=0.0, attn_gpu=False)
    t = predict_throughput(TINY, toy_profile(cpu_read_bw=1e6), pol, 96, 64)
    kv_read = 128 * 2 * 4 * 32 * 2  # one sequence's K and V of one layer
    assert t.terms["CPU memory bus"] == pytest.approx(4 * kv_read / 1e6)
    assert t.binding == "CPU memory bus"


def test_throughput_gpu_bound():
    pol = ThroughputPolicy(N=4, mu=2, r_w=1.0, r_c=0.0, attn_gpu=False)
    t = predict_throughput(TINY, toy_profile(gpu_bw=1e6), pol, 96, 64)
    dense = 256 * (256 + 2 * 128) + 256 * 256 + 2 * 256 + 256 * 8  # Q K V O, two norms, router
    used = 8 * (1 - (1 - 2 / 8) ** 2)  # experts two tokens touch
    per_mb = dense * 2 + used * 3 * 256 * 512 * 2 + 2 * 2 * 2 * (256 + 512) * 2
    assert t.terms["GPU"] == pytest.approx(2 * per_mb / 1e6)
    assert t.binding == "GPU"


def test_hrm_expert_intensity_and_attainable():
    N, H, I, K, E = 64, MIXTRAL.hidden_size, MIXTRAL.expert_intermediate_size, 2, 8
    k = expert_ffn(MIXTRAL, N, experts=E)
    assert k.intensity() == pytest.approx(6 * N * H * I * K / (2 * N * H + 2 * N * I + 6 * H * I * E))
    p = reference_profile()
    assert attainable(k, "GPU", "GPU", p) == pytest.approx(min(p.gpu_flops, p.gpu_bw * k.intensity()))
    assert attainable(k, "GPU", "CPU", p) == pytest.approx(p.h2d_bw * k.link_intensity())  # the link binds


def test_a_decode_step_pays_its_own_host_time_once():
    p = reference_profile()
    base = predict_latency(MIXTRAL, p, 24 * GiB, "auto")
    slow = predict_latency(MIXTRAL, replace(p, step_overhead_s=5 * MS), 24 * GiB, "auto")
    assert 1 / slow.decode_tps == pytest.approx(1 / base.decode_tps + 5 * MS)  # once per token, not per layer
    assert slow.token.overhead == pytest.approx(base.token.overhead + 5 * MS) and slow.ttft_s == base.ttft_s


def test_a_decode_layer_pays_for_each_routed_expert_beyond_the_measured_two():
    """expert_overhead_s: each expert a decode layer routes a token to beyond the tiny model's 2 (Mixtral: none;
    Qwen3: 6 more) adds its host time to every MoE layer of a decode step, and nothing to a prefill."""
    p = reference_profile()
    more = replace(p, expert_overhead_s=0.1 * MS)
    for cfg, extra in ((MIXTRAL, 0), (QWEN, 6)):
        base, slow = (predict_latency(cfg, q, 24 * GiB, "auto") for q in (p, more))
        L = len(cfg.moe_layers)
        assert 1 / slow.decode_tps == pytest.approx(1 / base.decode_tps + L * extra * 0.1 * MS)
        assert slow.ttft_s == base.ttft_s
    assert replace(p, layer_overhead_s=0.1 * MS, expert_overhead_s=0.2 * MS).decode_layer_s(1) == 0.0


def test_a_measured_resident_layer_sets_the_decode_layers_non_expert_part():
    """resident_layers: a decode layer of the model's shapes with its experts on the GPU, as measured. The model
    leaves its non-expert part what the host's share and the experts' wave do not take, so a layer whose
    experts are all there takes the measured time; a figure below the roofline's changes nothing, nor TTFT."""
    from moeflow.perf.layers import layer_key
    from moeflow.perf.model import dense_gpu_s

    p = replace(reference_profile(), layer_overhead_s=0.2 * MS)
    measured = replace(p, resident_layers={layer_key(MIXTRAL): 3 * MS})
    costs = p.expert_costs(MIXTRAL)
    wave = costs.with_rates(MIXTRAL.expert_numel * 2, p.gpu_bw, p.cpu_read_bw, p.h2d_bw).gpu_wave([(1, 1.0)] * 2)
    roof = dense_gpu_s(MIXTRAL, p, 0, 1, 512 + 128 // 2, 2)  # the default prompt and half the generation
    assert roof + wave + 0.2 * MS < 3 * MS
    for policy, budget in (("gpu", 100 * GiB), ("auto", 24 * GiB)):
        base, slow = (predict_latency(MIXTRAL, q, budget, policy, 1.0, costs=costs) for q in (p, measured))
        assert 1 / slow.decode_tps - 1 / base.decode_tps == \
            pytest.approx(len(MIXTRAL.moe_layers) * (3 * MS - roof - wave - 0.2 * MS))
        assert slow.ttft_s == base.ttft_s
    low = replace(p, resident_layers={layer_key(MIXTRAL): 1e-6})
    assert predict_latency(MIXTRAL, low, 24 * GiB, "auto", 0.5).decode_tps == \
        predict_latency(MIXTRAL, p, 24 * GiB, "auto", 0.5).decode_tps > 0
    assert measured.resident_layer(QWEN) == 0.0  # another model's shapes: not measured


def test_a_quantized_runs_faster_experts_shorten_a_measured_resident_layer():
    """The profile times its resident layer with dense experts. A run whose experts' GPU times are half the
    profile's (int4 GEMVs) saves the wave's difference in every layer whose experts are all there; the
    non-expert part stays what the dense layer left."""
    from moeflow.perf.layers import layer_key

    p = replace(reference_profile(), layer_overhead_s=0.2 * MS, resident_layers={layer_key(MIXTRAL): 3 * MS})
    dense = p.expert_costs(MIXTRAL)
    fast = replace(dense, gpu_s=tuple(t / 2 for t in dense.gpu_s), gpu_fixed_s=dense.gpu_fixed_s / 2)
    eb = MIXTRAL.expert_numel * 2
    base, quick = (predict_latency(MIXTRAL, p, 100 * GiB, "gpu", 1.0, costs=c, expert_bytes=eb) for c in (dense, fast))
    saved = dense.gpu_wave([(1, 1.0)] * 2) - fast.gpu_wave([(1, 1.0)] * 2)
    assert saved > 0
    assert 1 / base.decode_tps - 1 / quick.decode_tps == pytest.approx(len(MIXTRAL.moe_layers) * saved)


def test_the_hosts_speed_scales_its_share_of_each_layer_and_step():
    """host_speed (perf/probe.py): the host running twice as slow as at the profile adds each decode layer's host
    share and the step's own once more (the resident layer's non-expert part stays what it was at the profile's
    speed), and slows prefills; the CPU's expert times stay the profile's."""
    from moeflow.perf.layers import layer_key
    from moeflow.perf.probe import host_speed

    p = replace(reference_profile(), layer_overhead_s=0.2 * MS, step_overhead_s=0.5 * MS,
                resident_layers={layer_key(MIXTRAL): 3 * MS})
    costs = p.expert_costs(MIXTRAL)

    def at(policy, budget, **kw):
        return predict_latency(MIXTRAL, p, budget, policy, 1.0 if policy == "gpu" else 0.5, costs=costs, **kw)
    base, same, slow = at("gpu", 100 * GiB), at("gpu", 100 * GiB, host_speed=1.0), at("gpu", 100 * GiB, host_speed=2.0)
    assert (same.decode_tps, same.ttft_s) == (base.decode_tps, base.ttft_s)
    assert 1 / slow.decode_tps - 1 / base.decode_tps == pytest.approx(len(MIXTRAL.moe_layers) * 0.2 * MS + 0.5 * MS)
    assert slow.ttft_s > base.ttft_s
    fast, slow = at("cpu", 24 * GiB), at("cpu", 24 * GiB, host_speed=2.0)
    assert 1 / slow.decode_tps - 1 / fast.decode_tps == pytest.approx(len(MIXTRAL.moe_layers) * 0.2 * MS + 0.5 * MS)
    assert host_speed(3 * MS, 2 * MS) == 1.5 and host_speed(None, 2 * MS) == host_speed(1.0, 0.0) == 1.0


# -- monotonicity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru"])
def test_more_budget_never_slower(policy):
    p = reference_profile()
    tps = [predict_latency(MIXTRAL, p, gb * GiB, policy).decode_tps for gb in range(8, 90, 4)]
    assert all(b >= a - 1e-9 for a, b in zip(tps, tps[1:])), tps


@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru"])
def test_more_budget_never_slower_ttft(policy):
    """TTFT of a warm engine: more slots hold more of each layer's experts, resident or cached."""
    p = reference_profile()
    ttft = [predict_latency(MIXTRAL, p, gb * GiB, policy).ttft_s for gb in range(24, 90, 8)]
    assert all(b <= a + 1e-9 for a, b in zip(ttft, ttft[1:])), ttft
    assert ttft[-1] < 0.7 * ttft[0], ttft  # lru too: its cache holds most of a layer at 80 GiB


@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru"])
def test_higher_hit_rate_never_slower(policy):
    p = reference_profile()
    tps = [predict_latency(QWEN, p, 16 * GiB, policy, h / 10).decode_tps for h in range(11)]
    assert all(b >= a - 1e-9 for a, b in zip(tps, tps[1:])), tps


@pytest.mark.parametrize("policy", ["auto", "fiddler", "lru"])
def test_measured_prefill_hits_and_experts(policy):
    """TTFT at the prompt's measured hit rate: more hits are faster (within 5%: a hit of a large wave pays its
    own launches on the GPU, where auto's CPU takes a miss beside it); a prompt routed to fewer experts
    (Qwen3's synthetic router sends one to ~30 of 128) leaves fewer misses at the same hit rate."""
    p = reference_profile()
    ttft = [predict_latency(QWEN, p, 16 * GiB, policy, 0.5, prefill_hit=h / 10).ttft_s for h in range(11)]
    assert all(b <= 1.05 * a for a, b in zip(ttft, ttft[1:])) and ttft[-1] < 0.5 * ttft[0], ttft
    few = predict_latency(QWEN, p, 16 * GiB, policy, 0.5, prefill_hit=0.5, prefill_used=30).ttft_s
    assert few < ttft[5]


def test_a_large_wave_runs_in_grouped_passes():
    c = replace(flat_costs(), gpu_fixed_s=0.4 * MS)
    assert c.gpu_wave([(8, 1.0)] * 8) == pytest.approx((0.4 + 8 * 0.6) * MS)    # 64 entries: one pass
    assert c.gpu_wave([(8, 1.0)] * 9) == pytest.approx((2 * 0.4 + 9 * 0.6) * MS)  # 72 at one token: two
    assert c.gpu_wave([(8, 1.0)] * 9, tokens=72) == pytest.approx((0.4 + 9 * 0.6) * MS)  # a 72-token step: one


def test_a_grouped_pass_fits_the_steps_workspace():
    """The pass cap from the workspace: a pass of grouped_cap(N) entries beside the layer's live tensors never
    needs more than the workspace of an N-token step, and it is larger where an entry is small (Qwen3's 4,096
    entries of a 512-token prompt: two passes; they took eight at one entry per token)."""
    from moeflow.engine.budget import pass_entries_per_token, pass_entry_bytes, workspace_bytes
    from moeflow.perf.costs import grouped_cap

    for cfg in (MIXTRAL, QWEN):
        for b in (2, 4):
            per = pass_entries_per_token(cfg, b)
            live = b * 4 * cfg.hidden_size + 8 * cfg.hidden_size + 4 * cfg.num_experts
            for n in (1, 7, 64, 512, 4096):
                cap = grouped_cap(n, per)
                assert cap * pass_entry_bytes(cfg, b) + n * live <= workspace_bytes(cfg, n, b), (cfg, b, n)
    assert len(grouped_passes([32] * 128, grouped_cap(512, pass_entries_per_token(QWEN, 2)))) == 2
    assert pass_entries_per_token(QWEN, 2) > pass_entries_per_token(MIXTRAL, 2) > 1.0
    c = replace(flat_costs(), gpu_fixed_s=0.4 * MS)
    assert c.gpu_wave([(8, 1.0)] * 9, tokens=36, per_token=2.0) == pytest.approx((0.4 + 9 * 0.6) * MS)  # room: 72
    assert c.gpu_wave([(8, 1.0)] * 9, tokens=36) == pytest.approx((2 * 0.4 + 9 * 0.6) * MS)  # room for 64


def test_grouped_passes_cut_in_order():
    assert grouped_passes([30, 30, 10, 64, 1], 64) == [[0, 1], [2], [3], [4]]
    assert grouped_passes([100, 5], 64) == [[0], [1]]   # an expert on more entries than the cap goes alone
    assert grouped_passes([], 64) == []


def test_placement_raises_hit_rate():
    L, E = len(MIXTRAL.moe_layers), MIXTRAL.num_experts
    skewed = [[100.0 if e < 2 else 1.0 for e in range(E)] for _ in range(L)]
    p = reference_profile()
    uniform = predict_latency(MIXTRAL, p, 24 * GiB, "auto")
    placed = predict_latency(MIXTRAL, p, 24 * GiB, "auto", torch.tensor(skewed))
    assert placed.hit_rate > uniform.hit_rate and placed.decode_tps > uniform.decode_tps


# -- search -------------------------------------------------------------------------------------------------
def test_search_latency_plan():
    plan = search_latency(MIXTRAL, reference_profile(), 24 * GiB)
    assert plan.policy == "auto"
    assert plan.predictions["gpu"].error and "too small" in plan.predictions["gpu"].error
    b = plan.best.budget
    assert b["dense_bytes"] + b["kv_bytes"] + b["workspace_bytes"] + b["slots"] * b["expert_bytes"] <= 24 * GiB
    assert len(plan.resident) == b["resident"]


def test_copy_threshold():
    pts = (1, 4, 16, 64, 256)
    costs = ExpertCosts(pts, tuple(n * MS for n in pts), (0.5 * MS,) * 5, 10 * MS)  # CPU 1 ms/token, copy 10.5
    assert copy_threshold(costs) == 11
    assert copy_threshold(flat_costs(cpu=1 * MS)) is None


@pytest.mark.parametrize("gb", [24, 76])
def test_search_throughput_feasible(gb):
    p = reference_profile()
    best = search_throughput(MIXTRAL, p, gb * GiB, 128, 128)
    gpu, host = throughput_memory(MIXTRAL, best.policy, 128, 128)
    assert gpu <= gb * GiB and host <= p.host_memory
    assert best.tokens_per_s > 0 and 0 <= best.policy.r_w <= 1


def test_infeasible_inputs_say_what_does_not_fit():
    p = reference_profile()
    with pytest.raises(MoeflowError, match="short by"):
        search_latency(MIXTRAL, p, 2 * GiB)
    with pytest.raises(MoeflowError, match="host memory.*short by"):
        search_throughput(MIXTRAL, p, 24 * GiB, 128, 128, host_memory=64 * GiB)
    with pytest.raises(MoeflowError, match="short by"):
        search_throughput(MIXTRAL, p, 3 * GiB, 128, 128)


# -- config without weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [MIXTRAL, QWEN, replace(QWEN, dense_layers=(0, 3), dense_intermediate_size=6144,
                                                        tie_word_embeddings=True, attention_bias=True)])
def test_dense_numel_matches_the_model(cfg):
    from moeflow.models import get_architecture

    with torch.device("meta"):
        model = get_architecture(cfg.model_type).build(cfg, None)
    assert cfg.dense_numel == sum(p.numel() for p in model.parameters())


# -- moeflow plan ---------------------------------------------------------------------------------------------
def test_plan_cli_end_to_end(tmp_path, capsys):
    png, ref = tmp_path / "roof.png", tmp_path / "ref.json"
    reference_profile().save(ref)
    args = ["plan", "--model", "synthetic:mixtral-8x7b", "--gpu-memory", "24GiB", "--roofline", str(png)]
    assert main(args + ["--profile", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "auto" in out and "fiddler" in out and "lru" in out
    assert "Binding resource of auto: CPU memory bus" in out
    assert "bound by PCIe" in out  # the throughput plan streams experts over PCIe at 24 GiB
    if not torch.cuda.is_available():
        assert main(args) == 0
        assert "reference profile" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert png.exists() and png.stat().st_size > 10_000


def test_plan_cli_errors(tmp_path, capsys):
    assert main(["plan", "--model", "synthetic:mixtral-8x7b", "--gpu-memory", "2GiB", "--workload", "latency"]) == 2
    assert "short by" in capsys.readouterr().err
    cpu_only = toy_profile(gpu_name=None)
    cpu_only.save(tmp_path / "cpu.json")
    assert main(["plan", "--gpu-memory", "24GiB", "--profile", str(tmp_path / "cpu.json")]) == 2
    assert "without a GPU" in capsys.readouterr().err


def test_model_accuracy_cli(tmp_path, capsys):
    ref = tmp_path / "ref.json"
    reference_profile().save(ref)
    rows = [{"policy": p, "gpu_memory_gib": 24, "routing": "native", "decode_tps": tps, "ttft_s": 1.0,
             "ttft_prompt_tokens": 512, "hit_rate": 0.2} for p, tps in (("auto", 3.97), ("fiddler", 2.12))]
    rows.append({"policy": "lru", "gpu_memory_gib": 24, "decode_tps": 2.8, "hit_rate": 0.2, "ttft_s": 2.0,
                 "predicted_decode_tps": 2.5, "predicted_ttft_s": 1.5, "predicted_binding": "PCIe"})
    rows.append({"policy": "gpu", "gpu_memory_gib": 24, "error": "too small"})
    results = tmp_path / "latency.json"
    results.write_text(json.dumps({"model": "synthetic:mixtral-8x7b", "new_tokens": 128, "rows": rows}))
    out_json, png = tmp_path / "acc.json", tmp_path / "acc.png"
    assert main(["bench", "model-accuracy", "--results", str(results), "--profile", str(ref), "--plot", str(png),
                 "--out", str(out_json)]) == 0
    got = json.loads(out_json.read_text())
    assert [r["policy"] for r in got] == ["auto", "fiddler", "lru"]
    assert got[2]["decode_error"] == pytest.approx(2.5 / 2.8 - 1)  # carried predictions are used as they are
    assert all(abs(r["decode_error"]) < 0.5 for r in got)
    assert got[2]["ttft_error"] == pytest.approx(1.5 / 2.0 - 1)
    out = capsys.readouterr().out
    assert "decode within 20%" in out
    assert f"TTFT within 20%: {sum(abs(r['ttft_error']) <= 0.2 for r in got)} of 3" in out
    pytest.importorskip("matplotlib")
    assert png.exists()


def _row(policy: str, costs: ExpertCosts, **kw) -> dict:
    """A `bench latency` row as the model reads it: what was measured, none of the predictions."""
    return {"policy": policy, "gpu_memory_gib": 24, "routing": "native", "decode_tps": 3.0, "ttft_s": 1.0,
            "ttft_prompt_tokens": 512, "hit_rate": 0.3, "costs": costs.as_dict(), "budget": {"gpu_memory": 24 * GiB},
            "prefill": {"hit_rate": 0.25, "experts_per_layer": 8.0, "tokens_per_expert": []}} | kw


def test_a_row_is_predicted_from_what_it_measured():
    """predict_row: the row's own expert costs drive the prediction (a CPU twice as slow predicts fiddler, whose
    misses run on the CPU, slower), and a budget the model cannot fit is an error, not a figure."""
    from moeflow.bench.accuracy import predict_row

    hw = reference_profile()
    costs = hw.expert_costs(MIXTRAL)
    fast = predict_row(_row("fiddler", costs), MIXTRAL, hw, "m", 64)
    slow = predict_row(_row("fiddler", costs.scaled(2.0)), MIXTRAL, hw, "m", 64)
    assert 0 < slow["predicted_decode_tps"] < fast["predicted_decode_tps"] and fast["predicted_binding"]
    assert predict_row(_row("lru", costs), MIXTRAL, hw, "m", 64)["predicted_ttft_s"] > 0
    assert "too small" in predict_row(_row("auto", costs, budget={"gpu_memory": GiB}), MIXTRAL, hw, "m", 64)[
        "predicted_error"]


def test_a_row_is_predicted_at_the_speed_its_probes_found():
    """predict_row: a row whose probe reading beside its decode took twice the profile's is predicted with the
    host's share doubled; its prefills' reading, as the profile's, leaves the TTFT as at the profile's speed,
    which the row also carries; a profile without a reading predicts at its own speed."""
    from moeflow.bench.accuracy import predict_row

    hw = replace(reference_profile(), probe_s=1 * MS)
    costs = hw.expert_costs(MIXTRAL)
    probes = {"decode": 2 * MS, "ttft": 1 * MS}
    plain = predict_row(_row("lru", costs), MIXTRAL, hw, "m", 64)
    probed = predict_row(_row("lru", costs, probes=probes), MIXTRAL, hw, "m", 64)
    assert plain["host_speed"] == {"decode": 1.0, "ttft": 1.0} and probed["host_speed"]["decode"] == 2.0
    assert plain["predicted_decode_tps"] == plain["predicted_decode_tps_at_profile_speed"] == \
        probed["predicted_decode_tps_at_profile_speed"] > probed["predicted_decode_tps"]
    assert probed["predicted_ttft_s"] == probed["predicted_ttft_s_at_profile_speed"] == plain["predicted_ttft_s"]
    unread = predict_row(_row("lru", costs, probes=probes), MIXTRAL, reference_profile(), "m", 64)
    assert unread["predicted_decode_tps"] == unread["predicted_decode_tps_at_profile_speed"]


def test_model_accuracy_compares_the_medians_of_a_configurations_repeats():
    """`bench latency --repeat` rows of one configuration are compared by the median of the measured and of the
    predicted figures: one slow repetition (or one odd prediction) does not decide the error."""
    from moeflow.bench.accuracy import accuracy_rows

    costs = reference_profile().expert_costs(MIXTRAL)
    rows = [_row("auto", costs, decode_tps=d, ttft_s=t, predicted_decode_tps=p, predicted_ttft_s=1.0,
                 predicted_binding="PCIe", repeat=i)
            for i, (d, t, p) in enumerate([(3.0, 1.1, 4.4), (5.0, 3.0, 4.0), (4.0, 1.0, 100.0)])]
    rows.append(_row("lru", costs, predicted_decode_tps=2.7, predicted_ttft_s=2.0, predicted_binding="PCIe"))
    auto, lru = accuracy_rows({"rows": rows}, reference_profile(), MIXTRAL)
    assert auto["runs"] == 3 and auto["decode_range"] == [3.0, 5.0]
    assert auto["decode_tps"] == 4.0 and auto["predicted_decode_tps"] == 4.4
    assert auto["decode_error"] == pytest.approx(0.1) and auto["ttft_error"] == pytest.approx(1.0 / 1.1 - 1)
    assert lru["runs"] == 1 and lru["decode_error"] == pytest.approx(2.7 / 3.0 - 1)
