"""Several ranks (dist/): CPU processes with gloo stand in for GPUs. The tiny models' greedy tokens over two
ranks are those of one process for every policy; a rank that dies or hangs stops the others with one error."""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from conftest import budget_for
from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.config import OffloadConfig
from moeflow.dist.ep import local_ids, owners
from moeflow.dist.launch import DistConfig, launch
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
MAX_LEN, MAX_SEQS = 64, 2
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
POLICIES = [None, "gpu", "cpu", "auto", "fiddler", "lru"]  # None: every expert local, no offloading


@pytest.fixture(autouse=True)
def one_thread():
    """This process's reference runs on one thread, as each rank has one core here (a loaded 2-core host
    slows PyTorch's thread pool by far more than it helps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 310, (n,), generator=g).tolist() for n in (13, 5)]


def mine(path, ranks):
    """[L, E] the experts this rank loads: round-robin."""
    from moeflow.checkpoint import read_model_config

    cfg = read_model_config(path)[1]
    return owners(None, len(cfg.moe_layers), cfg.num_experts, ranks.world) == ranks.rank


def offload_for(ck, policy):
    if policy is None:
        return None
    slots = len(ck.cfg.moe_layers) * ck.cfg.num_experts if policy == "gpu" else 5
    return OffloadConfig(budget_for(ck, slots, MAX_SEQS, MAX_LEN), policy=policy)


def tokens_on_ranks(path, out, device, ranks):
    """Every policy's tokens over the ranks, each policy a new engine on the same checkpoint (split once);
    rank 0 writes them to `out` (JSON). cuda: in fp32, the one-process run's dtype there."""
    from moeflow.dist.engine import DistEngine, follow, stop_followers

    ck = load(path, device=ranks.device, dtype=torch.float32 if device == "cuda" else None, expert_device="cpu",
              owned=mine(path, ranks))
    if not ranks.leader:
        return follow(ck, ranks)
    got, budgets = {}, {str(p): offload_for(ck, p) for p in POLICIES}  # from the whole model's sizes
    for policy in POLICIES:
        engine = DistEngine(ck, ranks, max_seqs=MAX_SEQS, max_len=MAX_LEN, offload=budgets[str(policy)])
        got[str(policy)] = [s.output_ids for s in engine.generate(prompts(), GREEDY)]
        engine.close()
    stop_followers(ranks)
    out.write_text(json.dumps(got))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_two_ranks_give_one_process_tokens_for_every_policy(hf_checkpoint, tmp_path, model_type):
    path = hf_checkpoint(model_type)[0]
    out = tmp_path / "tokens.json"
    launch(functools.partial(tokens_on_ranks, path, out, "cpu"), DistConfig(2, "cpu", timeout_s=60))
    got = json.loads(out.read_text())
    want = LLMEngine(load(path), max_seqs=MAX_SEQS, max_len=MAX_LEN).generate(prompts(), GREEDY)
    for policy in POLICIES:
        assert got[str(policy)] == [s.output_ids for s in want], policy


def local_tokens_on_ranks(paths, out, ranks):
    """Each checkpoint's tokens over the ranks, every expert local; rank 0 writes them to `out` (JSON)."""
    from moeflow.dist.engine import DistEngine, follow, stop_followers

    got = []
    for path in paths:
        ck = load(path, device="cpu", expert_device="cpu", owned=mine(path, ranks))
        if not ranks.leader:
            follow(ck, ranks)
            continue
        got.append([s.output_ids for s in DistEngine(ck, ranks, max_seqs=MAX_SEQS, max_len=MAX_LEN)
                    .generate(prompts(), GREEDY)])
        stop_followers(ranks)
    if ranks.leader:
        out.write_text(json.dumps(got))


def test_two_ranks_give_one_process_tokens_for_every_architecture(hf_checkpoint, tmp_path):
    """MLA (attention whole on each rank), shared experts gated or not, dense layers, a q/k norm over all heads,
    biases, sinks and windows: each splits (or stays whole) and keeps the tokens."""
    types = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "olmoe", "phimoe", "gpt_oss"]
    paths = [hf_checkpoint(t)[0] for t in types]
    out = tmp_path / "tokens.json"
    launch(functools.partial(local_tokens_on_ranks, paths, out), DistConfig(2, "cpu", timeout_s=60))
    for t, path, got in zip(types, paths, json.loads(out.read_text())):
        want = LLMEngine(load(path), max_seqs=MAX_SEQS, max_len=MAX_LEN).generate(prompts(), GREEDY)
        assert got == [s.output_ids for s in want], t


def test_ownership_spreads_popular_experts_evenly():
    counts = torch.tensor([[100.0, 90, 1, 1, 50, 40], [0, 0, 0, 9, 8, 7]])
    own = owners(counts, 2, 6, 2)
    assert (own == 0).sum(1).tolist() == [3, 3] and (own == 1).sum(1).tolist() == [3, 3]
    assert own[0, 0] != own[0, 1] and own[1, 3] != own[1, 4]      # the two most used apart
    assert owners(None, 2, 5, 2).tolist() == [[0, 1, 0, 1, 0]] * 2  # no profile: round-robin
    assert local_ids(owners(None, 1, 5, 2) == 1).tolist() == [[-1, 0, -1, 1, -1]]


@pytest.mark.parametrize("compact", [True, False])
def test_the_ranks_partial_outputs_sum_to_the_whole_layer(compact):
    """Each rank's ExpertParallel over its local store, owned pairs only (compact) or every pair with the others
    weighted 0: the partial outputs of 3 ranks add up to LocalExperts over all experts."""
    from conftest import mixtral_store
    from moeflow.dist.ep import ExpertParallel, local_store
    from moeflow.experts.local import LocalExperts
    from moeflow.experts.store import ExpertStore

    store = ExpertStore(mixtral_store(32, 48, 2, 0.1).cfg, torch.float32, "cpu")  # 8 experts, top-2, 2 layers
    store.data.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)])       # [N, K]
    w = torch.rand(5, 2, generator=g)
    own = owners(torch.rand(2, 8, generator=g), 2, 8, 3)
    for layer in store.layers:
        want = LocalExperts(store)(layer, x, ids, w)
        parts = [ExpertParallel(LocalExperts(local_store(store, local_ids(own == r))), local_ids(own == r),
                                store.layers, x.device, compact)(layer, x, ids, w) for r in range(3)]
        torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_a_rank_loads_its_own_experts_only(hf_checkpoint, model_type):
    """A load with `owned` fills exactly the owned experts as a whole load does (GPT-OSS writes its fused
    experts part by part)."""
    from moeflow.dist.ep import OwnedStore, local_store

    path = hf_checkpoint(model_type)[0]
    whole = load(path).store
    own = owners(None, len(whole.cfg.moe_layers), whole.cfg.num_experts, 2) == 1
    part = load(path, owned=own).store
    assert isinstance(part, OwnedStore)
    torch.testing.assert_close(local_store(part, local_ids(own)).data, local_store(whole, local_ids(own)).data,
                               rtol=0, atol=0)


def dies_mid_run(ranks):
    x = torch.ones(4)
    for step in range(10**6):
        ranks.all_reduce(x)
        if ranks.rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)


def hangs(ranks):
    if ranks.rank == 1:
        time.sleep(600)
    ranks.all_reduce(torch.ones(4))


def test_a_rank_killed_mid_run_stops_the_other_with_one_error():
    t0 = time.monotonic()
    # the launcher sees rank 1 die, or (on a slow host) rank 0 fail first on the connection rank 1 dropped
    with pytest.raises(MoeflowError, match=r"rank 1 stopped \(signal 9\)|rank 0 failed: ") as e:
        launch(dies_mid_run, DistConfig(2, "cpu", timeout_s=20))
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 60


def test_a_collective_that_waits_too_long_fails_by_the_timeout():
    with pytest.raises(MoeflowError, match="rank 0 failed: .*"):
        launch(hangs, DistConfig(2, "cpu", timeout_s=3))


def test_generate_over_two_ranks_prints_the_same_text(hf_checkpoint, capfd):
    from moeflow.cli import main

    path = str(hf_checkpoint("mixtral")[0])
    argv = ["generate", "--model", path, "--device", "cpu", "--max-new-tokens", "8", "--ignore-eos"]
    assert main(argv) == 0
    want = capfd.readouterr().out
    assert main(argv + ["--gpus", "2"]) == 0
    assert capfd.readouterr().out == want


def test_one_device_flags_are_refused_before_any_rank_starts(capsys):
    from moeflow.cli import main

    assert main(["generate", "--model", "synthetic:tiny-mixtral", "--gpus", "2", "--deterministic"]) == 2
    assert "--deterministic runs on one GPU" in capsys.readouterr().err


def test_more_gpus_than_the_host_has_is_refused():
    with pytest.raises(MoeflowError, match="asks for 64 GPUs"):
        DistConfig(64, "cuda").check()
    with pytest.raises(MoeflowError, match="at least 1"):
        DistConfig(0, "cpu").check()


@pytest.mark.gpu
def test_one_rank_on_cuda_gives_the_plain_tokens(hf_checkpoint, tmp_path):
    path = hf_checkpoint("qwen3_moe")[0]
    out = tmp_path / "tokens.json"
    launch(functools.partial(cuda_tokens, path, out), DistConfig(1, "cuda", timeout_s=60))
    want = LLMEngine(load(path, device="cuda"), max_seqs=MAX_SEQS, max_len=MAX_LEN).generate(prompts(), GREEDY)
    assert json.loads(out.read_text()) == [s.output_ids for s in want]


def cuda_tokens(path, out, ranks):
    from moeflow.dist.engine import DistEngine

    engine = DistEngine(load(path, device=ranks.device), ranks, max_seqs=MAX_SEQS, max_len=MAX_LEN)
    out.write_text(json.dumps([s.output_ids for s in engine.generate(prompts(), GREEDY)]))


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_two_ranks_on_cuda_give_one_process_tokens_for_every_policy(hf_checkpoint, tmp_path, model_type):
    """Two ranks on the GPU(s) (sharing one where the host has one, the activations then over gloo), offloading
    on the GPU for real: each policy's fp32 tokens are one process's."""
    path = hf_checkpoint(model_type)[0]
    out = tmp_path / "tokens.json"
    launch(functools.partial(tokens_on_ranks, path, out, "cuda"), DistConfig(2, "cuda", 60, share_gpus=True))
    got = json.loads(out.read_text())
    for policy in POLICIES:
        ck = load(path, device="cuda", dtype=torch.float32, expert_device="cpu" if policy else None)
        engine = LLMEngine(ck, max_seqs=MAX_SEQS, max_len=MAX_LEN, offload=offload_for(ck, policy))
        assert got[str(policy)] == [s.output_ids for s in engine.generate(prompts(), GREEDY)], policy
        engine.close()

def test_plan_for_two_gpus_adds_the_collectives_to_each_rank_share():
    from moeflow.checkpoint import read_model_config
    from moeflow.dist.plan import ALL_REDUCE_S, plan_with_collectives, rank_config, rank_profile
    from moeflow.perf.profile import reference_profile
    from moeflow.perf.search import search_latency

    _, cfg = read_model_config("synthetic:mixtral-8x7b")
    one = search_latency(cfg, reference_profile(), 24 * 2**30, name="mixtral")
    rcfg = rank_config(cfg, 2)
    assert (rcfg.num_experts, rcfg.num_experts_per_tok) == (4, 1)
    share = search_latency(rcfg, rank_profile(reference_profile(), cfg, 2), 24 * 2**30, name="mixtral")
    two = plan_with_collectives(share, cfg, ALL_REDUCE_S)
    extra = 2 * cfg.num_hidden_layers * ALL_REDUCE_S
    for k, p in two.predictions.items():
        if p.error is None:
            assert 1 / p.decode_tps == pytest.approx(1 / share.predictions[k].decode_tps + extra)
    assert two.best.decode_tps > one.best.decode_tps  # half the experts per GPU at the same budget per GPU


def leader_leaves_without_a_word(ranks):
    if ranks.rank == 1:
        time.sleep(600)  # as a follower stuck in a collective rank 0 will never join


def test_the_others_are_stopped_when_rank_zero_ends_without_them(monkeypatch):
    import moeflow.dist.launch as launch_module

    monkeypatch.setattr(launch_module, "FOLLOWERS_GRACE_S", 1)
    t0 = time.monotonic()
    launch(leader_leaves_without_a_word, DistConfig(2, "cpu", timeout_s=600))
    assert time.monotonic() - t0 < 60
