"""Fixtures: tiny random checkpoints saved by transformers itself (the published tensor layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.engine.budget import step_workspace
from moeflow.synthetic import _tokenizer_for

TINY = {
    "mixtral": dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.1),
    "qwen3_moe": dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=512,
                      bos_token_id=317, eos_token_id=319, initializer_range=0.1),
}


def budget_for(ck, slots: int, max_seqs: int = 2, max_len: int = 64) -> int:
    """A GPU budget that leaves exactly `slots` expert slots for an engine of max_seqs x max_len (what
    attach_offload computes)."""
    kv = ck.cfg.kv_bytes_per_token(ck.store.data.dtype) * max_seqs * max_len
    fixed = ck.dense_bytes + kv + step_workspace(ck.cfg, kv, max_len, ck.store.data.element_size(), max_seqs)
    return fixed + slots * ck.store.expert_bytes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_hf_checkpoint(path: Path, model_type: str, seed: int = 0, **overrides):
    """Build a random transformers model, save it with save_pretrained plus a tokenizer; return the model."""
    import transformers

    kwargs = TINY[model_type] | overrides
    if model_type == "mixtral":
        cfg, cls = transformers.MixtralConfig(**kwargs), transformers.MixtralForCausalLM
    else:
        cfg, cls = transformers.Qwen3MoeConfig(**kwargs), transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    _tokenizer_for({"model_type": model_type, **kwargs}).save(path)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(model_type, **config overrides) -> (folder, transformers model)."""

    def make(model_type: str = "mixtral", **overrides):
        path = tmp_path / f"{model_type}-ckpt"
        return path, save_hf_checkpoint(path, model_type, **overrides)

    return make
