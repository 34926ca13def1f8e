"""DeepSeek-V2/V3 against transformers' own classes on tiny random checkpoints: the parity tests of
test_parity.py on MLA models, routing variants, the latent KV cache and its budget, every offloading policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.experts.cpu import CpuExperts, jobs_from_topk
from test_cpu_experts import HERE, check, reference, routed, weights
from test_offload import (test_every_policy_gives_the_local_tokens,  # noqa: F401  (collected here, on `ckpt`)
                          test_trace_replay_gives_the_same_tokens_for_every_policy)
import test_parity
from test_parity import (test_batch_of_two_lengths_matches_each_alone,  # noqa: F401  (collected here, on `pair`)
                         test_greedy_decode_matches_with_and_without_cache, test_prefill_logits_match_transformers)

# Each architecture's first case runs every parity test; the variants (cheaper) the logits of every position.
CASES = [("deepseek_v2", {}), ("deepseek_v3", {})]  # V2-Lite's form with YaRN; V3's noaux_tc with q_lora_rank
VARIANTS = [
    ("deepseek_v2", {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                     "rope_scaling": None, "n_shared_experts": 1}),
    ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                      "original_max_position_embeddings": 128}, "rope_interleave": False,
                     "norm_topk_prob": False}),
]


@pytest.fixture(params=CASES, ids=[t for t, _ in CASES])
def pair(request, hf_checkpoint):
    return make_pair(hf_checkpoint, *request.param)


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=["v2-qlora-grouped-ropeplain", "v3-yarn-halves-unnorm"])
def test_variant_prefill_logits_match_transformers(hf_checkpoint, model_type, overrides):
    test_parity.test_prefill_logits_match_transformers(make_pair(hf_checkpoint, model_type, overrides))


def make_pair(hf_checkpoint, model_type: str, overrides: dict):
    path, hf = hf_checkpoint(model_type, **overrides)
    if model_type == "deepseek_v3":
        steer_v3(hf, path)
    ck = load(path)
    assert ck.store.data.dtype == torch.float32
    return hf, LLMEngine(ck, max_seqs=4, max_len=128)


def steer_v3(hf, path) -> None:
    """transformers starts e_score_correction_bias at zero: random biases (saved again) make them steer the
    choice of groups and experts, as in a trained V3."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    hf.save_pretrained(path)


@pytest.fixture
def ckpt(hf_checkpoint):
    """A tiny DeepSeek-V2 folder for test_offload's tests: every policy on the CPU as both tiers."""
    return hf_checkpoint("deepseek_v2")[0]


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_latent_cache_and_dense_count(hf_checkpoint, model_type):
    """The cache holds the latent and the rope key per token and layer, not expanded heads; the config's count
    of non-expert weights (the budget's dense part: attention, shared experts, routers) is the model's."""
    path, hf = hf_checkpoint(model_type)
    ck = load(path)
    cfg = ck.cfg
    assert cfg.kv_token_shapes == ((32,), (8,)) and cfg.kv_bytes_per_token(4) == 3 * (32 + 8) * 4
    eng = LLMEngine(ck, max_seqs=2, max_len=16)
    assert [tuple(t.shape) for t in eng.cache[1]] == [(2, 16, 32), (2, 16, 8)]
    assert eng.cache.nbytes == cfg.kv_bytes_per_token(4) * 2 * 16
    assert cfg.dense_numel == sum(p.numel() for p in ck.model.parameters()) == ck.dense_bytes // 4
    hf_dense = sum(p.numel() for n, p in hf.named_parameters() if ".experts." not in n) + \
        sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert cfg.dense_numel == hf_dense


@pytest.mark.parametrize("change,match", [
    ({"topk_method": "fancy"}, "topk_method 'fancy'"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
    ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group dividing the 64 experts"),
])
def test_unsupported_options_fail_naming_them(change, match):
    from moeflow.models import get_architecture
    from moeflow.synthetic import PRESETS

    with pytest.raises(MoeflowError, match=match):
        get_architecture("deepseek_v2").config(PRESETS["deepseek-v2-lite"] | change)
    with pytest.raises(MoeflowError, match="fewer than two of the 256 experts per group"):
        get_architecture("deepseek_v3").config(PRESETS["deepseek-v3"] | {"n_group": 256, "topk_group": 4})
    with pytest.raises(MoeflowError, match="topk_method 'greedy'"):
        get_architecture("deepseek_v3").config(PRESETS["deepseek-v3"] | {"topk_method": "greedy"})


TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "deepseek-v2-lite-chat.dev.npz"


def test_trace_layers_are_the_moe_layers_after_the_dense_one(tmp_path):
    """Trace layer i drives the model's i-th MoE layer (layer i + 1 behind first_k_dense_replace = 1); a trace
    with a layer per decoder layer is refused, naming both counts and the model's MoE layers."""
    from moeflow.checkpoint import read_model_config
    from moeflow.experts.trace import TraceRouting, load_trace

    _, cfg = read_model_config("synthetic:deepseek-v2-lite")
    assert cfg.moe_layers == list(range(1, 27)) and cfg.num_experts_per_tok == 6
    ids = np.stack([np.full((3, 6), i, np.uint8) for i in range(26)], axis=1)  # [T, 26, 6]: layer i picks i
    np.savez(tmp_path / "t.npz", experts=ids)
    seen = {}
    router = TraceRouting(lambda layer, x, i, w: seen.setdefault(layer, i.tolist()), load_trace(tmp_path / "t.npz"),
                          cfg)
    for layer in (1, 26):
        router(layer, torch.zeros(1, 8), torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6))
    assert seen == {1: [[0] * 6], 26: [[25] * 6]}
    np.savez(tmp_path / "all.npz", experts=np.zeros((3, 27, 6), np.uint8))
    with pytest.raises(MoeflowError, match=r"27 MoE layers.*26 MoE layers \(layers 1\.\.26\)"):
        load_trace(tmp_path / "all.npz").check(cfg)


@pytest.mark.skipif(not TRACE.exists(), reason="../shared/data DeepSeek-V2-Lite trace absent")
def test_real_deepseek_trace_fits_the_preset():
    from moeflow.checkpoint import read_model_config
    from moeflow.experts.trace import load_trace

    trace = load_trace(TRACE)
    trace.check(read_model_config("synthetic:deepseek-v2-lite")[1])
    assert trace.shape[1:] == (26, 6) and trace.shape[0] > 90000 and int(trace.ids.max()) == 63


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v3"])
def test_too_large_presets_say_the_bytes_and_plan_from_the_config(name, monkeypatch, capsys):
    """Random weights that cannot fit the host are refused before anything is allocated; plan reads the config."""
    from moeflow import synthetic
    from moeflow.checkpoint import read_model_config

    if name not in synthetic.PRESETS:
        pytest.skip(f"{name} preset not defined")
    monkeypatch.setattr(synthetic, "host_memory_bytes", lambda: 128 << 30)
    cfg = read_model_config(f"synthetic:{name}")[1]
    need = (cfg.dense_numel + len(cfg.moe_layers) * cfg.num_experts * cfg.expert_numel) * 2 / 2**30
    with pytest.raises(MoeflowError, match=rf"synthetic:{name} needs {need:.1f} GiB .* this host has 128.0 GiB"):
        synthetic.build_synthetic(name, dtype="bf16")
    assert need > 400


@pytest.mark.parametrize("kernel", HERE)
def test_cpu_kernel_runs_the_v2_lite_expert_shape(kernel, monkeypatch):
    """The CPU expert kernel (every path this CPU runs) on DeepSeek-V2-Lite's 2048 x 1408 experts."""
    monkeypatch.setenv("MOEFLOW_CPU_KERNEL", kernel)
    data, g = weights(3, 2048, 1408, seed=0)
    x = torch.randn(3, 2048, generator=g).bfloat16()
    ids, w = routed(3, 3, 2, g)
    got = CpuExperts(threads=2).layer(data, x, ids, w)
    check(got, reference(data, x, jobs_from_topk(ids, w, 3), 1408), kernel)


@torch.inference_mode()
def test_graph_decode_mask_matches_the_single_path(hf_checkpoint):
    """A decode step as the CUDA graph builds it (the whole slot under a mask from device positions) gives the
    plain single-sequence step's logits; the padded form of two sequences gives each one's own."""
    from moeflow.engine.kv_cache import KVCache
    from moeflow.models.layers import AttnBatch

    ck = load(hf_checkpoint("deepseek_v2")[0])
    model, cpu = ck.model, torch.device("cpu")
    cache = KVCache(ck.cfg, 3, 64, torch.float32, cpu)
    prompts = [list(range(5, 22)), list(range(40, 47))]
    for slot, p in zip((1, 2), prompts):
        model(torch.tensor(p), AttnBatch.build([slot], [0], [len(p)], cpu), cache)
    n = len(prompts[0])
    single = model.logits(model(torch.tensor([7]), AttnBatch.build([1], [n], [1], cpu), cache))
    graph = model.logits(model(torch.tensor([7]), AttnBatch.graph_decode(1, torch.tensor([n]), 64), cache))
    torch.testing.assert_close(graph, single, rtol=1e-5, atol=1e-5)
    padded = model.logits(model(torch.tensor([7, 9]), AttnBatch.build([2, 1], [7, n], [1, 1], cpu), cache))
    alone = model.logits(model(torch.tensor([9]), AttnBatch.build([1], [n], [1], cpu), cache))
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
