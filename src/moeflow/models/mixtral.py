"""Mixtral (8x7B, 8x22B): softmax over experts, top-2, renormalized; no q/k norm; optional sliding window."""

from __future__ import annotations

from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture

_PARTS = {"gate": "w1", "down": "w2", "up": "w3"}


@register
class Mixtral(Architecture):
    model_type = "mixtral"
    hf_class = "MixtralForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        return ModelConfig(
            model_type="mixtral",
            **shared_fields(hf, 1e-5, 32768),
            num_experts=require(hf, "num_local_experts")[0],
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            expert_intermediate_size=require(hf, "intermediate_size")[0],
            norm_topk_prob=True,
            rope_theta=rope_theta_from_hf(hf),
            sliding_window=hf.get("sliding_window"),
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
            "sliding_window": cfg.sliding_window, "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": "silu", "torch_dtype": cfg.torch_dtype, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        }

    @staticmethod
    def hf_name(name: str) -> str:
        return Architecture.hf_name(name).replace(".mlp.", ".block_sparse_moe.")

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_PARTS[part]}.weight"
