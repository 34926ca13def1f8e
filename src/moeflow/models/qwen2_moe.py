"""Qwen2-MoE and Qwen1.5-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): biases on q/k/v, softmax top-k routing, and one
shared expert every token runs, its output scaled by a sigmoid gate (dense weights, kept with attention)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow import MoeflowError
from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture
from moeflow.models.layers import DenseMLP, MoeTransformer, SparseMoe
from moeflow.models.qwen3_moe import _dense_layers


class GatedShared(nn.Module):
    """The shared expert scaled per token by sigmoid(shared_expert_gate(x)). x [N, H] -> [N, H]"""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.mlp = DenseMLP(hidden, inter)
        self.gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.mlp(x)


@register
class Qwen2Moe(Architecture):
    model_type = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        n_layers = require(hf, "num_hidden_layers")[0]
        if hf.get("use_sliding_window"):
            raise MoeflowError("use_sliding_window is not supported for model_type 'qwen2_moe'")
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if experts is None:
            raise MoeflowError("config.json lacks num_experts (model_type 'qwen2_moe')")
        return ModelConfig(
            model_type="qwen2_moe",
            **shared_fields(hf, 1e-6, 32768),
            num_experts=experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 4),
            expert_intermediate_size=require(hf, "moe_intermediate_size")[0],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rope_theta=rope_theta_from_hf(hf),
            dense_intermediate_size=hf.get("intermediate_size", 0),
            dense_layers=_dense_layers(hf, n_layers),
            qkv_bias=bool(hf.get("qkv_bias", True)),  # Qwen1.5/2 configs predate the key: always biased
            shared_intermediate_size=hf.get("shared_expert_intermediate_size", 0) or 0,
            shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")),
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return {
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.dense_intermediate_size or cfg.shared_intermediate_size,
            "moe_intermediate_size": cfg.expert_intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(cfg.dense_layers), "qkv_bias": cfg.qkv_bias,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings, "use_sliding_window": False,
            "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": cfg.torch_dtype,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        }

    @staticmethod
    def hf_name(name: str) -> str:
        name = name.replace(".mlp.shared_experts.gate.", ".mlp.shared_expert_gate.")
        return Architecture.hf_name(name.replace(".mlp.shared_experts.mlp.", ".mlp.shared_expert."))

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"

    @staticmethod
    def build(cfg: ModelConfig, experts) -> MoeTransformer:
        model = MoeTransformer(cfg, experts)
        if cfg.shared_intermediate_size:
            for m in model.modules():
                if isinstance(m, SparseMoe):
                    m.shared_experts = GatedShared(cfg.hidden_size, cfg.shared_intermediate_size)
        return model
