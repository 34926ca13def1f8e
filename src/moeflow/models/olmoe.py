"""OLMoE (OLMoE-1B-7B, arXiv:2409.02060): RMSNorm over the whole q and k projections, 64 experts top-8."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture


@register
class Olmoe(Architecture):
    model_type = "olmoe"
    hf_class = "OlmoeForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        H, heads = require(hf, "hidden_size", "num_attention_heads")
        if hf.get("clip_qkv") is not None:
            raise MoeflowError(f"OLMoE clip_qkv={hf['clip_qkv']} is not supported; moeflow supports clip_qkv null")
        if hf.get("head_dim") not in (None, H // heads):
            raise MoeflowError("OLMoE with head_dim != hidden_size / num_attention_heads is not supported")
        return ModelConfig(
            model_type="olmoe",
            **shared_fields(hf, 1e-5, 4096),
            num_experts=require(hf, "num_experts")[0],
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            expert_intermediate_size=require(hf, "intermediate_size")[0],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rope_theta=rope_theta_from_hf(hf),
            qk_norm=True,
            qk_norm_whole=True,
            attention_bias=bool(hf.get("attention_bias", False)),
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return {
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "norm_topk_prob": cfg.norm_topk_prob, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.attention_bias,
            "clip_qkv": None, "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
            "torch_dtype": cfg.torch_dtype, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        }

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"
