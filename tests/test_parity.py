"""moeflow's forward pass against transformers' own Mixtral and Qwen3-MoE on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from moeflow.checkpoint import load
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams

CASES = [
    ("mixtral", {}),
    ("mixtral", {"sliding_window": 12}),                      # window shorter than prompt + output
    ("qwen3_moe", {}),
    ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [1]}),  # unnormalized top-k, a dense layer
]
IDS = [f"{t}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for t, o in CASES]
N_NEW = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def prompts(seed: int, lengths=(21, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 310, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, ids: list[int], use_cache: bool) -> list[int]:
    hf.generation_config.eos_token_id = None  # compare full-length outputs
    hf.generation_config.pad_token_id = 0
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, use_cache=use_cache)
    return out[0, len(ids):].tolist()


@pytest.fixture(params=CASES, ids=IDS)
def pair(request, hf_checkpoint):
    model_type, overrides = request.param
    path, hf = hf_checkpoint(model_type, **overrides)
    ck = load(path)
    assert ck.store.data.dtype == torch.float32
    return hf, LLMEngine(ck, max_seqs=4, max_len=128)


@torch.inference_mode()
def test_prefill_logits_match_transformers(pair):
    hf, eng = pair
    for ids in prompts(1):
        ours = eng.prefill_logits([ids])[0]
        ref = hf(torch.tensor([ids])).logits[0]
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-4


@torch.inference_mode()
def test_batch_of_two_lengths_matches_each_alone(pair):
    hf, eng = pair
    for k, v in eng.cache.layers:  # stale values from earlier requests must stay behind the mask
        k.normal_(0, 100)
        v.normal_(0, 100)
    batch = prompts(2, lengths=(23, 7))
    for ours, ids in zip(eng.prefill_logits(batch), batch):
        assert rel_err(ours, hf(torch.tensor([ids])).logits[0]) < 1e-4
    seqs = eng.generate(batch, SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    for seq, ids in zip(seqs, batch):
        assert seq.output_ids == hf_greedy(hf, ids, use_cache=True)


@torch.inference_mode()
def test_greedy_decode_matches_with_and_without_cache(pair):
    hf, eng = pair
    ids = prompts(3)[0]
    ref_cached, ref_uncached = hf_greedy(hf, ids, True), hf_greedy(hf, ids, False)
    assert ref_cached == ref_uncached
    (seq,) = eng.generate([ids], SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    assert len(seq.output_ids) == N_NEW
    assert seq.output_ids == ref_cached
    # moeflow without its KV cache: re-run the whole sequence for every token
    tokens = list(ids)
    for _ in range(N_NEW):
        tokens.append(int(eng.prefill_logits([tokens])[0][-1].argmax()))
    assert tokens[len(ids):] == ref_cached


def test_router_semantics():
    """Mixtral always renormalizes the top-k; Qwen3 only with norm_topk_prob."""
    from moeflow.models.layers import route

    logits = torch.randn(5, 8)
    probs = torch.softmax(logits, -1)
    ids, w = route(logits, 2, renormalize=False)
    assert torch.allclose(w, probs.gather(1, ids))
    ids2, w2 = route(logits, 2, renormalize=True)
    assert torch.equal(ids, ids2) and torch.allclose(w2.sum(-1), torch.ones(5))
    assert torch.allclose(w2, w / w.sum(-1, keepdim=True))
