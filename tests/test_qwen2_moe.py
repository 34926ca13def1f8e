"""Qwen2-MoE / Qwen1.5-MoE against transformers' Qwen2MoeForCausalLM on a tiny random checkpoint: the parity tests
of test_parity.py, the shared expert's weights in the dense count, offloading (auto, lru)."""

from __future__ import annotations

import pytest

from moeflow.checkpoint import load, read_model_config
from moeflow.engine.llm_engine import LLMEngine
import test_offload
import test_parity
from test_parity import (test_batch_of_two_lengths_matches_each_alone,  # noqa: F401  (collected here, on `pair`)
                         test_greedy_decode_matches_with_and_without_cache, test_prefill_logits_match_transformers)


@pytest.fixture
def pair(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2_moe")
    return hf, LLMEngine(load(path), max_seqs=4, max_len=128)


def test_renormalized_unbiased_variant_logits(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2_moe", norm_topk_prob=True, mlp_only_layers=[], qkv_bias=False)
    test_parity.test_prefill_logits_match_transformers((hf, LLMEngine(load(path), max_seqs=4, max_len=128)))


@pytest.mark.parametrize("policy", ["auto", "lru"])
def test_offloading_gives_the_local_tokens(ckpt, policy):
    test_offload.test_every_policy_gives_the_local_tokens(ckpt, policy)


@pytest.fixture
def ckpt(hf_checkpoint):
    return hf_checkpoint("qwen2_moe")[0]


def test_shared_expert_counts_as_dense_and_the_preset_reads(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2_moe")
    ck = load(path)
    assert ck.cfg.dense_numel == sum(p.numel() for p in ck.model.parameters())
    assert ck.cfg.dense_numel == sum(p.numel() for n, p in hf.named_parameters() if ".experts." not in n)
    cfg = read_model_config("synthetic:qwen1.5-moe-a2.7b")[1]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_intermediate_size) == (60, 4, 1408)
    assert cfg.qkv_bias and cfg.shared_expert_gate and cfg.shared_intermediate_size == 5632
