"""Phi-3.5-MoE (arXiv:2404.14219): LayerNorm with bias, attention and lm_head biases, the sparsemixer router
(top-2), longrope RoPE; Mixtral's tensor names."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture
from moeflow.models.rope import rope_scaling_from_hf

_PARTS = {"gate": "w1", "down": "w2", "up": "w3"}


@register
class Phimoe(Architecture):
    model_type = "phimoe"
    hf_class = "PhimoeForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        k = hf.get("num_experts_per_tok", 2)
        if k != 2:
            raise MoeflowError(f"Phi-MoE's sparsemixer router picks 2 experts; config.json asks for {k}")
        return ModelConfig(
            model_type="phimoe",
            **shared_fields(hf, 1e-5, 4096 * 32),
            num_experts=require(hf, "num_local_experts")[0],
            num_experts_per_tok=k,
            expert_intermediate_size=require(hf, "intermediate_size")[0],
            norm_topk_prob=False,
            rope_theta=rope_theta_from_hf(hf, scaled=("longrope",)),
            rope_scaling=rope_scaling_from_hf(hf, ("longrope",)),
            attention_bias=bool(hf.get("attention_bias", False)),
            layer_norm=True,
            lm_head_bias=bool(hf.get("lm_head_bias", False)),
            router="sparsemixer",
            router_jitter_eps=float(hf.get("router_jitter_noise", 0.01)),
            sliding_window=hf.get("sliding_window"),
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        rope = {"rope_theta": cfg.rope_theta}
        if cfg.rope_scaling:
            rope["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.rope_scaling}
            # top level too: transformers' generate re-runs a sequence crossing it only where it finds it there
            rope["original_max_position_embeddings"] = rope["rope_scaling"].get("original_max_position_embeddings")
        return rope | {
            "architectures": ["PhimoeForCausalLM"], "model_type": "phimoe",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "attention_bias": cfg.attention_bias, "lm_head_bias": cfg.lm_head_bias,
            "router_jitter_noise": cfg.router_jitter_eps, "input_jitter_noise": 0.0,
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
