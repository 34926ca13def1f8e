"""OLMoE (OLMoE-1B-7B, arXiv:2409.02060): RMSNorm over the whole q and k projections, 64 experts top-8."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.config import ModelConfig, eos_ids_from, require, rope_theta_from_hf
from moeflow.models import register
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
            vocab_size=require(hf, "vocab_size")[0],
            hidden_size=H,
            num_hidden_layers=require(hf, "num_hidden_layers")[0],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=H // heads,
            num_experts=require(hf, "num_experts")[0],
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            expert_intermediate_size=require(hf, "intermediate_size")[0],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            qk_norm=True,
            qk_norm_whole=True,
            attention_bias=bool(hf.get("attention_bias", False)),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids_from(hf.get("eos_token_id")),
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
