"""fMoE expert maps: the store's bound and file checks, the hints' matching, `bench cache` and `maps build`."""

import json
from pathlib import Path

import numpy as np
import pytest

from moeflow import MoeflowError
from moeflow.bench.cache import evaluate
from moeflow.cli import main
from moeflow.maps.predict import Predictor
from moeflow.maps.store import ExpertMapStore, dedup, one_hot_maps

# ../shared/data beside the checkout, or shared/data inside it
DATA = next((p / "shared" / "data" / "traces" for p in Path(__file__).resolve().parents[1:3]
             if (p / "shared" / "data" / "traces").is_dir()), Path("/nonexistent"))
L, E, K = 4, 8, 2  # tiny-mixtral's MoE shape: bench cache finds its timing by it


def topic_trace(path: Path, requests: int = 12, tokens: int = 20, seed: int = 0) -> Path:
    """An .npz trace whose requests each follow one of three routings (a 'topic') with one expert in four
    replaced at random: maps of past requests of the topic predict a new one's."""
    rng = np.random.default_rng(seed)
    topics = [np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(3)]
    ids = []
    for r in range(requests):
        base = topics[r % 3]
        for _ in range(tokens):
            t = base.copy()
            noise = rng.random(t.shape) < 0.25
            t[noise] = rng.integers(0, E, noise.sum())
            for layer in range(L):  # keep a token's K experts distinct
                if t[layer, 0] == t[layer, 1]:
                    t[layer, 1] = (t[layer, 0] + 1) % E
            ids.append(t)
    np.savez(path, experts=np.array(ids, np.uint8), offsets=np.arange(requests + 1) * tokens)
    return path


def test_store_round_trip_and_bound(tmp_path):
    rng = np.random.default_rng(1)
    store = ExpertMapStore(L, E, K, dim=3, capacity=10)
    for _ in range(5):
        ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(6)])
        store.add_request(one_hot_maps(ids, E), rng.random(3))
    assert len(store) == 10 and store.seen == 30  # reservoir: bounded, every map counted
    f = tmp_path / "maps.npz"
    store.save(f)
    back = ExpertMapStore.load(f)
    assert np.array_equal(back.maps, store.maps) and np.array_equal(back.emb, store.emb)
    assert (back.L, back.E, back.K, back.seen) == (L, E, K, 30)


def test_dedup_drops_repeats():
    ids = np.zeros((5, L, K), np.int64)
    ids[:, :, 1] = 1
    ids[3, 0] = [2, 3]  # one token differs
    assert dedup(one_hot_maps(ids, E)) == [0, 3, 4]


def test_map_file_errors(tmp_path):
    store = ExpertMapStore(L, E, K)
    store.add_request(one_hot_maps(np.zeros((2, L, K), np.int64) + [0, 1], E))
    f = tmp_path / "maps.npz"
    store.save(f)
    with pytest.raises(MoeflowError, match="4 MoE layers x 8 experts; the model has 26 x 64"):
        ExpertMapStore.load(f).check(26, 64)
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(MoeflowError, match="not a readable expert-map file"):
        ExpertMapStore.load(bad)
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(MoeflowError, match="not a readable expert-map file"):
        ExpertMapStore.load(tmp_path / "junk.npz")
    with pytest.raises(MoeflowError, match="does not exist"):
        ExpertMapStore.load(tmp_path / "none.npz")
    with pytest.raises(MoeflowError, match="expert maps of shape"):
        store.add_request(np.zeros((1, L + 1, E)))


def test_trajectory_finds_the_stored_route():
    rng = np.random.default_rng(2)
    routes = [np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(4)]
    store = ExpertMapStore(L, E, K)
    for r in routes:
        store.add_request(one_hot_maps(r[None], E))
    pred = Predictor(store, depth=2, top_m=1)
    obs = one_hot_maps(routes[2][None], E)
    state = pred.start(1)
    pred.observe(state, 0, obs[:, 0])
    pred.observe(state, 1, obs[:, 1])
    p, score, first = pred.trajectory(state, 1)
    keys, prio, use = pred.select(p, score, first).of(0)
    assert score[0] == pytest.approx(1.0) and first == 2
    assert set(keys.tolist()) == {layer * E + e for layer in (2, 3) for e in routes[2][layer]}  # exactly top-K
    assert prio[0] > prio[-1] and np.all(use == 1.0)  # the nearer layer first


def test_poor_match_hedges():
    store = ExpertMapStore(1 + 1, E, K)
    store.add_request(one_hot_maps(np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]]), E))
    pred = Predictor(store, depth=1, top_m=2)
    p = np.full((1, 1, E), 1.0 / E)
    few = pred.select(p, np.array([1.0]), 1).of(0)[0]
    many = pred.select(p, np.array([0.2]), 1).of(0)[0]
    assert len(few) == K and len(many) > K  # 1 - s of a flat prediction takes more experts


def test_bench_cache_replay(tmp_path):
    trace = topic_trace(tmp_path / "topics.npz")
    res = evaluate(str(trace), [0.25], ["lru", "lfu", "static", "auto", "belady", "fmoe-traj"], fit=9,
                   log=lambda *a: None)
    rows = {r["policy"]: r for r in res["rows"]}
    assert res["scored_requests"] == 3 and res["scored_tokens"] == 60
    assert all(r["lookups"] == 60 * L * K for r in rows.values())
    assert rows["belady"]["hit_rate"] >= max(rows[p]["hit_rate"] for p in ("lru", "lfu", "static", "auto"))
    f = rows["fmoe-traj"]
    assert f["prefetches"] > 0 and f["useful_prefetches"] <= f["prefetches"]
    assert f["hit_rate"] > rows["lru"]["hit_rate"]  # the topics' maps predict the next layers
    forked = evaluate(str(trace), [0.25], ["lru", "fmoe-traj"], fit=9, log=lambda *a: None, jobs=2)["rows"]
    assert forked == [rows["lru"], f]  # the replays in worker processes give the same figures


def test_cli_bench_cache_and_maps_build(tmp_path, capsys):
    trace = topic_trace(tmp_path / "topics.npz", requests=4, tokens=6)
    out = tmp_path / "cache.json"
    assert main(["bench", "cache", "--trace", str(trace), "--sizes", "0.5", "--policies", "lru,fmoe-traj",
                 "--out", str(out)]) == 0
    assert [r["policy"] for r in json.loads(out.read_text())[0]["rows"]] == ["lru", "fmoe-traj"]
    maps = tmp_path / "maps.npz"
    assert main(["maps", "build", "--trace", str(trace), "--out", str(maps), "--prompts", "0:3"]) == 0
    assert ExpertMapStore.load(maps).L == L
    assert main(["maps", "build", "--trace", str(trace), "--out", str(maps), "--prompts", "3:9"]) == 2
    assert main(["bench", "cache", "--trace", str(trace), "--sizes", "2"]) == 2
    assert "--sizes" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "deepseek-v2-lite-chat.dev.npz").is_file(), reason="../shared/data traces absent")
def test_real_traces_split_by_request():
    from moeflow.maps.traces import load_requests, split_requests

    ds = load_requests(DATA / "deepseek-v2-lite-chat.dev.npz")
    fit, scored = split_requests(ds.requests, 800)
    assert (ds.requests, len(fit), len(scored), ds.experts) == (999, 800, 199, 64)
    assert ds.texts is not None and len(ds.texts) == 999
    mx = load_requests(DATA / "mixtral-8x7b-instruct.humaneval.jsonl")
    assert mx.requests == 2 and mx.weights is not None and mx.offsets[-1] == len(mx.ids)


def test_fmoe_prefetches_and_keeps_the_local_tokens(hf_checkpoint, tmp_path):
    """One sequence at a time: the second request (the first's prompt again) matches the first's maps (learned
    on line), the gate measures them as precise and it prefetches; the tokens are the all-local run's. A map
    file for another model is refused."""
    import torch
    from conftest import budget_for

    from moeflow.checkpoint import load
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams
    from moeflow.perf.costs import ExpertCosts

    path = hf_checkpoint("mixtral")[0]
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 310, (n,), generator=g).tolist() for n in (9, 9, 7)]
    ps[1] = ps[0]
    want = [s.output_ids for s in LLMEngine(load(path), max_seqs=1, max_len=64).generate(ps, greedy)]
    ck = load(path, device="cpu", expert_device="cpu")
    engine = LLMEngine(ck, max_seqs=1, max_len=64, offload=OffloadConfig(budget_for(ck, 5, 1), "fmoe"))
    backend = engine.model.experts
    pts = (1, 4, 16, 64, 256)  # copies cost next to nothing: every layer has room for the prefetches
    backend.costs = ExpertCosts(pts, tuple(1e-7 * n for n in pts), tuple(1e-5 for _ in pts), 1e-9)
    backend.calibrate = False
    got = [s.output_ids for s in engine.generate(ps, greedy)]
    assert got == want
    assert backend.policy.prefetched > 0 and len(backend.policy.store) > 0
    saved = tmp_path / "learned.npz"  # absent at the start: written as requests finish
    engine = LLMEngine(load(path, device="cpu", expert_device="cpu"), max_seqs=1, max_len=64,
                       offload=OffloadConfig(budget_for(ck, 5, 1), "fmoe", expert_maps=str(saved)))
    assert [s.output_ids for s in engine.generate(ps, greedy)] == want
    engine.model.experts.policy.flush()  # written on a thread
    assert len(ExpertMapStore.load(saved)) > 0
    blocked = tmp_path / "dir.npz"
    blocked.mkdir()  # cannot be written: logged, the tokens still come
    engine = LLMEngine(load(path, device="cpu", expert_device="cpu"), max_seqs=1, max_len=64,
                       offload=OffloadConfig(budget_for(ck, 5, 1), "fmoe", expert_maps=str(saved)))
    engine.model.experts.policy.save_path = str(blocked)
    assert [s.output_ids for s in engine.generate(ps, greedy)] == want
    engine.model.experts.policy.flush()
    assert engine.model.experts.policy.save_failed
    maps = tmp_path / "maps.npz"
    ExpertMapStore(3, 5, 2).save(maps)
    with pytest.raises(MoeflowError, match="expert maps are for 3 MoE layers x 5 experts"):
        LLMEngine(load(path, device="cpu", expert_device="cpu"), max_seqs=1, max_len=64,
                  offload=OffloadConfig(budget_for(ck, 5, 1), "fmoe", expert_maps=str(maps)))


@pytest.mark.gpu
def test_fmoe_prefetches_on_the_copy_stream_and_keeps_the_gpu_tokens(hf_checkpoint):
    """On CUDA, one sequence at a time (decode graphs on): prefetched slots are waited for before use."""
    import torch
    from conftest import budget_for

    from moeflow.checkpoint import load
    from moeflow.config import OffloadConfig
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.sequence import SamplingParams

    path = hf_checkpoint("mixtral")[0]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(3, 310, (n,), generator=g).tolist() for n in (11, 11, 8, 8)]
    ps[1], ps[3] = ps[0], ps[2]  # repeated prompts: the maps learned on line predict them (the gate opens)
    want = [s.output_ids for s in LLMEngine(load(path, device="cuda", dtype="fp32"), max_seqs=1,
                                            max_len=64).generate(ps, greedy)]
    ck = load(path, device="cuda", dtype="fp32", expert_device="cpu")
    engine = LLMEngine(ck, max_seqs=1, max_len=64, offload=OffloadConfig(budget_for(ck, 5, 1), "fmoe"))
    try:
        assert [s.output_ids for s in engine.generate(ps, greedy)] == want
        assert len(engine.model.experts.policy.store) > 0 and engine.model.experts.policy.prefetched > 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
