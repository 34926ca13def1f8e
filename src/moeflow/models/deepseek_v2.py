"""DeepSeek-V2 / V2-Lite (arXiv 2405.04434): multi-head latent attention (models/mla.py), YaRN RoPE, the first
`first_k_dense_replace` layers dense, `n_shared_experts` shared experts every token runs (dense weights, kept
with attention), routed experts by softmax with greedy or group-limited top-k and `routed_scaling_factor`."""

from __future__ import annotations

from torch import nn

from moeflow.config import ModelConfig, eos_ids_from, require
from moeflow.models.base import register
from moeflow.models.base import Architecture
from moeflow.models.layers import DenseMLP, MoeTransformer, SparseMoe
from moeflow.models.mla import MlaAttention
from moeflow.models.rope import rope_from_hf
from moeflow.models.routers import check_routing


def _dense_layers(hf: dict, n_layers: int) -> tuple[int, ...]:
    # DeepSeek's rule: a layer is MoE from first_k_dense_replace on, every moe_layer_freq-th layer
    first, freq = hf.get("first_k_dense_replace", 0) or 0, hf.get("moe_layer_freq", 1) or 1
    return tuple(i for i in range(n_layers) if i < first or i % freq != 0)


def deepseek_config(hf: dict, model_type: str, methods: tuple[str, ...], scorings: tuple[str, ...],
                    defaults: dict) -> ModelConfig:
    """The ModelConfig of a DeepSeek-V2 or V3 config.json; `defaults`: the transformers config's defaults."""
    def get(key: str):
        return defaults.get(key) if hf.get(key) is None else hf[key]

    H, heads, n_layers = require(hf, "hidden_size", "num_attention_heads", "num_hidden_layers")
    experts = hf.get("n_routed_experts", hf.get("num_experts", hf.get("num_local_experts")))
    if experts is None:
        require(hf, "n_routed_experts")
    method, scoring = get("topk_method"), get("scoring_func")
    check_routing(model_type, method, scoring, experts, get("n_group") or 1, get("topk_group") or 1, methods, scorings)
    theta, scaling = rope_from_hf(hf)
    nope, rope, v = get("qk_nope_head_dim"), get("qk_rope_head_dim"), get("v_head_dim")
    norm = bool(get("norm_topk_prob"))
    return ModelConfig(
        model_type=model_type,
        vocab_size=require(hf, "vocab_size")[0],
        hidden_size=H,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # MLA's K/V heads, as expanded from the latent
        head_dim=nope + rope,
        num_experts=experts,
        num_experts_per_tok=require(hf, "num_experts_per_tok")[0],
        expert_intermediate_size=require(hf, "moe_intermediate_size")[0],
        norm_topk_prob=norm,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        dense_intermediate_size=hf.get("intermediate_size", 0),
        dense_layers=_dense_layers(hf, n_layers),
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids_from(hf.get("eos_token_id")),
        rope_scaling=scaling,
        rope_interleave=bool(get("rope_interleave")),
        kv_lora_rank=require(hf, "kv_lora_rank")[0],
        q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        shared_intermediate_size=hf["moe_intermediate_size"] * (get("n_shared_experts") or 0),
        router="grouped_topk", scoring=scoring, topk_method=method, n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        # V2's published code scales the weights only when it does not renormalize them
        routed_scaling_factor=1.0 if norm and model_type == "deepseek_v2" else float(get("routed_scaling_factor")),
    )


def deepseek_hf_config(cfg: ModelConfig, hf_class: str) -> dict:
    rope = dict(cfg.rope_scaling)
    return {
        "architectures": [hf_class], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_intermediate_size or cfg.expert_intermediate_size * cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.shared_intermediate_size // cfg.expert_intermediate_size,
        "first_k_dense_replace": len(cfg.dense_layers), "moe_layer_freq": 1,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "norm_topk_prob": cfg.norm_topk_prob, "scoring_func": cfg.scoring,
        "topk_method": cfg.topk_method, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "rope_interleave": cfg.rope_interleave,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope | {"type": rope["rope_type"]},
        "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": cfg.torch_dtype,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
    }


def build_deepseek(cfg: ModelConfig, experts) -> MoeTransformer:
    """MLA attention; each MoE block gets the shared experts and (noaux_tc) the gate's bias (its router, by
    cfg.router: grouped_topk)."""
    model = MoeTransformer(cfg, experts, attention=MlaAttention)
    for m in model.modules():
        if isinstance(m, SparseMoe):
            if cfg.shared_intermediate_size:
                m.shared_experts = DenseMLP(cfg.hidden_size, cfg.shared_intermediate_size)
            if cfg.topk_method == "noaux_tc":
                m.gate.e_score_correction_bias = nn.Parameter(m.gate.weight.new_zeros(cfg.num_experts))
    return model


V2_DEFAULTS = dict(topk_method="greedy", scoring_func="softmax", qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=None,
                   rope_interleave=True, n_group=None, topk_group=None)


@register
class DeepseekV2(Architecture):
    model_type = "deepseek_v2"
    hf_class = "DeepseekV2ForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        # V2 always rotates adjacent pairs (its RoPE is written in complex numbers)
        return deepseek_config(hf | {"rope_interleave": True}, "deepseek_v2", ("greedy", "group_limited_greedy"),
                               ("softmax",), V2_DEFAULTS)

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return deepseek_hf_config(cfg, "DeepseekV2ForCausalLM")

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"

    @staticmethod
    def build(cfg: ModelConfig, experts) -> MoeTransformer:
        return build_deepseek(cfg, experts)
