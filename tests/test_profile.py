"""The hardware profile: its measurements (expert costs in rounds, monotone points, a CPU call's fixed part, the
prefill host axes), its cache and `moeflow profile`. CPU only, quick sizes; seconds."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import read_model_config
from moeflow.cli import main
from moeflow.perf import costs as costs_mod
from moeflow.perf import measure
from moeflow.perf import profile as prof
from moeflow.perf.costs import ExpertCosts, fixed_part
from moeflow.perf.probe import SpeedProbe
from moeflow.perf.profile import HardwareProfile, reference_profile

MIXTRAL = read_model_config("synthetic:mixtral-8x7b")[1]
QWEN = read_model_config("synthetic:qwen3-30b-a3b")[1]
TINY = read_model_config("synthetic:tiny-mixtral")[1]
MS = 1e-3
pytestmark = pytest.mark.usefixtures("cache")  # conftest's: a fresh profile cache per test


def toy_profile(cfg) -> HardwareProfile:
    """A CPU-only profile holding cfg's expert shape, made by hand (nothing measured)."""
    ref = reference_profile()
    return HardwareProfile(host="toy", cpu_model="toy CPU", cpu_threads=2, host_memory=1 << 30, cpu_read_bw=1e10,
                           cpu_flops=1e11, experts={prof.shape_key(cfg): next(iter(ref.experts.values()))})


# -- profile and its cache ------------------------------------------------------------------------------------
def test_profile_cache_and_refresh(cache, monkeypatch):
    p, how = measure.get_profile(TINY, "cpu", sizes=measure.QUICK, progress=False)
    assert how == "measured" and not p.has_gpu and p.has_shape(TINY)
    # a prefill's per-layer host time at each prompt measured, named with it
    assert p.prefill_tokens == measure.QUICK.prefill_tokens and len(p.prefill_overhead_s) == 2
    assert all(t >= 0 for t in p.prefill_overhead_s) and p.layer_overhead_s > 0 and p.step_overhead_s >= 0
    assert p.expert_overhead_s >= 0 and p.decode_layer_s(8) >= p.decode_layer_s(2) == p.layer_overhead_s
    assert p.probe_s > 0  # the host's speed read beside its figures (perf/probe.py)
    path = prof.profile_path("cpu")
    assert path.parent == cache and path.exists()
    assert HardwareProfile.load(path) == p
    assert measure.get_profile(TINY, "cpu", sizes=measure.QUICK, progress=False) == (p, "cached")
    q, how = measure.get_profile(QWEN.__class__(**{**TINY.__dict__, "expert_intermediate_size": 128}), "cpu",
                              sizes=measure.QUICK, progress=False)
    assert how == "added shape" and len(q.experts) == 2
    assert q.probe_s == p.probe_s  # read beside the host figures, which an added shape does not measure again
    # how long each measurement took (the budget: under a minute on the GPU host)
    assert re.fullmatch(r"measured \S+ \S+ in \d+ s \(quick sizes\)", p.source), p.source
    assert q.source.startswith(p.source + "; ") and re.search(r"added in \d+ s$", q.source), q.source
    # a refresh measures anew, from nothing cached (a stand-in measurement: the real one ran above)
    bases = []
    monkeypatch.setattr(measure, "measure_profile", lambda cfg, device, dtype_name, sizes, progress, base=None:
                        bases.append(base) or replace(p, source="measured again"))
    r, how = measure.get_profile(TINY, "cpu", refresh=True, sizes=measure.QUICK, progress=False)
    assert how == "measured" and bases == [None] and len(r.experts) == 1 and HardwareProfile.load(path) == r
    # another CPU model, or another version, is not this machine's profile
    d = json.loads(path.read_text())
    path.write_text(json.dumps(d | {"cpu_model": "elsewhere"}))
    assert prof.cached_profile("cpu") is None
    path.write_text(json.dumps(d | {"version": 0}))
    with pytest.raises(MoeflowError, match="version"):
        HardwareProfile.load(path)
    # an older version's figures still read (results JSONs hold them), its missing ones 0; a cached one is stale
    old = {k: v for k, v in d.items() if k != "expert_overhead_s"} | {"version": 1}
    path.write_text(json.dumps(old))
    assert HardwareProfile.load(path).expert_overhead_s == 0.0 and prof.cached_profile("cpu") is None


def test_profile_measures_a_cpu_calls_fixed_part(monkeypatch):
    """With room for 2 x 4 experts in the pool, the CPU expert step also times 4 in one call: the call's fixed
    part comes from that, between 0 and the time of one expert alone (each capped by the later points: noise
    only adds time)."""
    seen = []
    monkeypatch.setattr(costs_mod, "fixed_part", lambda t1, tm, m: seen.append((t1, tm, m)) or fixed_part(t1, tm, m))
    sizes = replace(measure.QUICK, expert_pool_bytes=16 * TINY.expert_bytes(torch.bfloat16))
    # the expert step alone, added to a toy profile of the host's figures (measured in the cache test)
    p = measure.measure_profile(TINY, "cpu", sizes=sizes, progress=False, base=replace(toy_profile(TINY), experts={}))
    c = ExpertCosts.from_dict(p.experts[prof.shape_key(TINY)])  # as measured
    (t1, tm, m), = seen
    assert m == measure.MANY and c.cpu_s[0] == min(t1, c.cpu_s[1]) and tm > 0
    assert c.cpu_fixed_s == min(fixed_part(t1, tm, m), c.cpu_s[0]) and 0.0 <= c.cpu_fixed_s <= c.cpu_s[0]
    # as used: each expert's own part at least its bytes over the measured read rate
    used = p.expert_costs(TINY)
    assert used.cpu_fixed_s <= c.cpu_fixed_s
    assert used.cpu_s[0] - used.cpu_fixed_s >= TINY.expert_bytes(torch.bfloat16) / p.cpu_read_bw - 1e-12


def test_costs_from_profile():
    ref = reference_profile()
    c = ref.expert_costs(MIXTRAL)
    assert c.cpu(1) == pytest.approx(7.4 * MS) and c.copy() == pytest.approx(6.6 * MS)
    q = ref.expert_costs(QWEN)  # scaled: a Qwen3 expert is 1/37 of a Mixtral one
    assert q.cpu(1) < c.cpu(1) / 20 and q.copy() == pytest.approx(16e-6 + QWEN.expert_numel * 2 / 54e9)


def test_profile_cli_cpu_only(capsys, monkeypatch):
    """`moeflow profile` prints the figures and where they come from (a stand-in measurement of this
    machine: test_profile_cache_and_refresh runs the real one)."""
    monkeypatch.setattr(measure, "measure_profile", lambda cfg, device, dtype_name, sizes, progress, base=None:
                        replace(toy_profile(cfg), cpu_model=prof.cpu_model(), source="measured (stand-in)"))
    assert main(["profile", "--model", "synthetic:tiny-mixtral", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "CPU memory read" in out and "measured" in out
    assert main(["profile", "--model", "synthetic:tiny-mixtral", "--device", "cpu", "--quick"]) == 0
    assert "cached" in capsys.readouterr().out



def test_measurements_of_the_costs_are_combined_by_their_medians():
    """A profile measures the expert costs in rounds: each field's median, point by point, so one slow round
    (every point 10x) is outvoted and the series stays monotone."""
    from moeflow.perf.costs import median_costs

    a = ExpertCosts((1, 4), (1.0, 2.0), (0.1, 0.2), 3.0, cpu_fixed_s=0.5, cpu_alone=0.8)
    b = ExpertCosts((1, 4), (10.0, 20.0), (0.3, 0.2), 1.0, cpu_fixed_s=0.1, cpu_alone=0.2)
    c = ExpertCosts((1, 4), (1.2, 1.8), (0.2, 0.3), 2.0, cpu_fixed_s=0.3, cpu_alone=1.0)
    m = median_costs([a, b, c])
    assert m.tokens == (1, 4) and m.cpu_s == (1.2, 2.0) and m.gpu_s == (0.2, 0.2)
    assert m.copy_s == 2.0 and m.cpu_fixed_s == 0.3 and m.cpu_alone == 0.8
    assert median_costs([a]) == a
    with pytest.raises(ValueError, match="token counts"):
        median_costs([a, ExpertCosts((1, 8), (1.0, 2.0), (0.1, 0.2), 3.0)])


def test_measured_times_never_fall_with_more_tokens():
    """A point measured above a later one (noise: 4.1 ms at 1 token, 0.66 at 4 on a busy host) is capped by it;
    rising series stay as measured."""
    from moeflow.perf.costs import monotone

    assert monotone([4.1, 0.66, 1.7, 2.1, 5.8]) == [0.66, 0.66, 1.7, 2.1, 5.8]
    assert monotone([0.19, 0.16, 0.18, 0.17, 0.11]) == [0.11] * 5
    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0] and monotone([]) == []


def test_cpu_matmul_grows_until_one_takes_long_enough(monkeypatch):
    """The CPU matmul's size doubles from 128 while one takes under the threshold, up to the cap: a slow CPU is
    timed on a small one instead of minutes on the full size."""
    import torch

    sizes = []
    monkeypatch.setattr(measure, "median_s", lambda fn, sync, r: (sizes.append(fn().shape[0]), 1.0)[1])
    assert measure.cpu_matmul_rate(torch.float32, 512, 1, enough_s=0.0) == 2 * 128**3 and sizes == [128]
    assert measure.cpu_matmul_rate(torch.float32, 512, 1, enough_s=1e9) == 2 * 512**3 and sizes[-1] == 512


def test_isotonic_fit_of_the_prefill_points():
    """Per-layer prefill host times, a difference of two timings, are fitted non-decreasing in the prompt:
    a falling run becomes its mean, a rising series stays."""
    from moeflow.perf.layers import isotonic

    assert isotonic([2.32, 3.96, 2.36]) == pytest.approx([2.32, 3.16, 3.16])
    assert isotonic([5.0, 1.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])
    assert isotonic([1.0, 2.0, 2.0, 4.0]) == [1.0, 2.0, 2.0, 4.0] and isotonic([]) == []


def test_measured_costs_are_monotone_with_or_without_copies():
    """measure_costs caps each point by the later ones after every measurement that sets one, the lone
    expert timed beside the m-expert call included (a 1-token call slowed by noise here: 3 ms against 0.4), and
    the call's fixed part with them."""
    import time as _time

    import torch

    from moeflow.perf.costs import measure_costs

    def cpu_ffn(x, block):
        _time.sleep(3e-3 if x.shape[0] == 1 else 4e-4)

    block = torch.zeros(3 * 8 * 4)
    c = measure_costs(lambda i: block, 8, 4, 2, torch.zeros_like(block), cpu_ffn, lambda x, s: None, repeats=1,
                      cpu_many=(2, lambda x: _time.sleep(4e-3)))
    assert all(a <= b for a, b in zip(c.cpu_s, c.cpu_s[1:])) and c.cpu_s[0] < 2e-3
    assert 0 < c.cpu_fixed_s <= c.cpu_s[0]  # the fixed part (2 ms from the slow pair) capped with its call


def test_a_gpu_profile_holds_the_models_resident_decode_layer():
    """With a GPU, a profile serves a model once it holds both its expert shape and its decode layer with the
    experts on the GPU (keyed by the layer's shapes: another attention is another key); without one, the
    expert shape alone."""
    from moeflow.perf.layers import layer_key

    p = toy_profile(TINY)
    assert p.has_layer(TINY) and p.resident_layers == {}
    assert not p.has_layer(replace(TINY, expert_intermediate_size=2 * TINY.expert_intermediate_size))
    gpu = replace(p, gpu_name="some GPU")
    assert gpu.has_shape(TINY) and not gpu.has_layer(TINY)
    assert replace(gpu, resident_layers={layer_key(TINY): 1e-3}).has_layer(TINY)
    other = replace(TINY, num_key_value_heads=TINY.num_key_value_heads // 2)
    assert layer_key(other) != layer_key(TINY) and prof.shape_key(other) == prof.shape_key(TINY)


def test_a_resident_layer_is_timed_as_the_engine_runs_it(monkeypatch):
    """time_resident_layer builds cfg's layers at two depths and times the engine's decode steps in turns: the
    slope is one layer's time. A layer holds all the model's experts where they fit in LAYER_EXPERT_BYTES,
    else the K a token uses; the layer's key names both counts."""
    from moeflow import synthetic
    from moeflow.perf import layers

    built, real = [], synthetic.build_like
    monkeypatch.setattr(synthetic, "build_like", lambda cfg, **kw: built.append(cfg) or real(cfg, **kw))
    t = layers.time_resident_layer(TINY, torch.device("cpu"), torch.float32, steps=8, repeats=3)  # medians of 3
    assert 0 < t < 1.0
    assert [(c.num_hidden_layers, c.num_experts) for c in built] == [(2, TINY.num_experts), (6, TINY.num_experts)]
    monkeypatch.setattr(layers, "LAYER_EXPERT_BYTES", 0)
    layers.time_resident_layer(TINY, torch.device("cpu"), torch.float32, steps=2, repeats=1)
    assert [c.num_experts for c in built[2:]] == [TINY.num_experts_per_tok] * 2
    assert layers.layer_key(TINY) != layers.layer_key(replace(TINY, num_experts=16))


def test_the_speed_probe_reads_a_decode_step_of_its_tiny_engine(monkeypatch):
    """SpeedProbe: seconds of a decode step, positive; the engine starts another sequence when too little of its
    own is left, and close() lets it go. A profile written with the readings per key still reads."""
    from moeflow.perf import probe as probe_mod

    # a reading: 2 runs of 8 steps after a warm-up run; a sequence of 96 has room for two, the third takes a new one
    monkeypatch.setattr(probe_mod, "PROBE_LEN", 96)
    probe = SpeedProbe("cpu", runs=2)
    seqs = []
    for _ in range(3):
        assert 0 < probe() < 1.0
        seqs.append(probe._seq)
    assert seqs[0] is not seqs[2] and not seqs[2].finished
    probe.close()
    assert probe._engine is None
    old = json.loads(reference_profile().to_json())
    del old["probe_s"]
    assert HardwareProfile.from_dict(old | {"probes": {"host": 2e-3, "2048x768:bfloat16": 1e-3}}).probe_s == 2e-3
