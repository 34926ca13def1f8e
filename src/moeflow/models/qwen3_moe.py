"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): RMSNorm on q/k heads, `norm_topk_prob`, optional dense layers."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture


def _dense_layers(hf: dict, n_layers: int) -> tuple[int, ...]:
    # A layer is dense if listed in mlp_only_layers or off the decoder_sparse_step grid (transformers' rule).
    only, step = set(hf.get("mlp_only_layers") or []), hf.get("decoder_sparse_step", 1) or 1
    return tuple(i for i in range(n_layers) if i in only or (i + 1) % step != 0)


@register
class Qwen3Moe(Architecture):
    model_type = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        n_layers = require(hf, "num_hidden_layers")[0]
        # transformers 5 writes num_local_experts where the published config says num_experts
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if experts is None:
            raise MoeflowError("config.json lacks num_experts (model_type 'qwen3_moe')")
        return ModelConfig(
            model_type="qwen3_moe",
            **shared_fields(hf, 1e-6, 32768),
            num_experts=experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            expert_intermediate_size=require(hf, "moe_intermediate_size")[0],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rope_theta=rope_theta_from_hf(hf),
            dense_intermediate_size=hf.get("intermediate_size", 0),
            dense_layers=_dense_layers(hf, n_layers),
            qk_norm=True,
            attention_bias=bool(hf.get("attention_bias", False)),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.dense_intermediate_size or cfg.expert_intermediate_size * cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layers),
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.attention_bias,
            "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": "silu", "torch_dtype": cfg.torch_dtype, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        }

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"
