"""DeepSeek-V3 (arXiv 2412.19437): DeepSeek-V2's attention and layout (models/deepseek_v2.py) with sigmoid router
scores, the gate's e_score_correction_bias steering a group-limited top-k (noaux_tc: n_group, topk_group), the
chosen scores renormalized and scaled by `routed_scaling_factor`. The multi-token-prediction layers are skipped."""

from __future__ import annotations

from moeflow.config import ModelConfig
from moeflow.models.base import register
from moeflow.models.base import Architecture
from moeflow.models.deepseek_v2 import V2_DEFAULTS, build_deepseek, deepseek_config, deepseek_hf_config
from moeflow.models.layers import MoeTransformer

V3_DEFAULTS = V2_DEFAULTS | dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                 n_group=8, topk_group=4, rope_interleave=True)


@register
class DeepseekV3(Architecture):
    model_type = "deepseek_v3"
    hf_class = "DeepseekV3ForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        return deepseek_config(hf, "deepseek_v3", ("noaux_tc",), ("sigmoid",), V3_DEFAULTS)

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        return deepseek_hf_config(cfg, "DeepseekV3ForCausalLM")

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"

    @staticmethod
    def build(cfg: ModelConfig, experts) -> MoeTransformer:
        return build_deepseek(cfg, experts)
