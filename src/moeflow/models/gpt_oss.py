"""GPT-OSS (gpt-oss-20b, gpt-oss-120b; arXiv:2508.10925): attention sinks, sliding-window and full layers in
turn, a biased router (top-k, then softmax over the k), experts with biases and the clamped SwiGLU, YaRN RoPE.

The published experts are fused per layer: gate_up_proj [E, H, 2I] with gate and up interleaved by column,
down_proj [E, I, H], and their biases; or, quantized, MXFP4 blocks and scales ([E, out, in/32, 16] bytes of two
4-bit values, [E, out, in/32] power-of-two exponents), which are dequantized on load. The store keeps one block
per expert: [gate | up | down] as every architecture, then the biases [gate (I) | up (I) | down (H)].
Legend: E = experts, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import torch

from moeflow.config import ModelConfig, require, rope_theta_from_hf, shared_fields
from moeflow.models.base import register
from moeflow.models.base import Architecture
from moeflow.models.rope import rope_scaling_from_hf

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., out, G, 16] uint8 (low nibble first), scales [..., out, G] uint8 (exponent + 127)
    -> [..., in, out] with in = 32 G: the bf16 checkpoint's orientation."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)   # [..., out, G, 16, 2]
    vals = torch.ldexp(vals.flatten(-2), scales.long()[..., None] - 127)                     # [..., out, G, 32]
    return vals.flatten(-2).transpose(-1, -2).to(dtype)


def _windows(hf: dict, n_layers: int) -> tuple:
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    return tuple(hf.get("sliding_window") if t == "sliding_attention" else None for t in types)


@register
class GptOss(Architecture):
    model_type = "gpt_oss"
    hf_class = "GptOssForCausalLM"

    @staticmethod
    def config(hf: dict) -> ModelConfig:
        n_layers = require(hf, "num_hidden_layers")[0]
        return ModelConfig(
            model_type="gpt_oss",
            **shared_fields(hf, 1e-5, 131072),
            num_experts=require(hf, "num_local_experts")[0],
            num_experts_per_tok=hf.get("num_experts_per_tok", 4),
            expert_intermediate_size=require(hf, "intermediate_size")[0],
            norm_topk_prob=True,
            rope_theta=rope_theta_from_hf(hf, scaled=("yarn",)),
            rope_scaling=rope_scaling_from_hf(hf, ("yarn",)),
            attention_bias=bool(hf.get("attention_bias", True)),
            sliding_window=hf.get("sliding_window"),
            layer_windows=_windows(hf, n_layers),
            attention_sinks=True,
            router="topk_softmax",
            router_bias=True,
            expert_bias=True,
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        )

    @staticmethod
    def hf_config(cfg: ModelConfig) -> dict:
        rope = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.rope_scaling}
        return {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.expert_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": rope or None,
            "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": cfg.attention_bias,
            "sliding_window": cfg.sliding_window,
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in cfg.layer_windows],
            "swiglu_alpha": cfg.swiglu_alpha, "swiglu_limit": cfg.swiglu_limit,
            "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": cfg.torch_dtype,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        }

    @staticmethod
    def hf_name(name: str) -> str:
        return Architecture.hf_name(name).replace(".mlp.gate.", ".mlp.router.")

    @staticmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{ {'down': 'down_proj'}.get(part, 'gate_up_proj') }"

    @staticmethod
    def _matrix(reader, name: str, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """A fused expert matrix [E, in, out], from bf16/fp32 or dequantized from its MXFP4 blocks and scales."""
        if reader.has(name) or not reader.has(name + "_blocks"):
            return reader.get(name, shape)
        E, n_in, n_out = shape
        blocks = reader.get(name + "_blocks", (E, n_out, n_in // 32, 16), dtypes=("U8",))
        scales = reader.get(name + "_scales", (E, n_out, n_in // 32), dtypes=("U8",))
        return torch.stack([dequantize_mxfp4(blocks[e], scales[e], dtype) for e in range(E)])

    @classmethod
    def load_experts(cls, reader, store, progress) -> None:
        cfg, dt = store.cfg, store.data.dtype
        E, I, H = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        for layer in store.layers:
            p = f"model.layers.{layer}.mlp.experts."
            gate_up = cls._matrix(reader, p + "gate_up_proj", (E, H, 2 * I), dt)        # [E, H, 2I]
            down = cls._matrix(reader, p + "down_proj", (E, I, H), dt)                  # [E, I, H]
            for e in range(E):
                store.part(layer, e, "gate").copy_(gate_up[e, :, 0::2].t())
                store.part(layer, e, "up").copy_(gate_up[e, :, 1::2].t())
                store.part(layer, e, "down").copy_(down[e].t())
            gub = reader.get(p + "gate_up_proj_bias", (E, 2 * I))
            bias = store.bias(layer)                                                    # [E, 2I + H]
            bias[:, :I], bias[:, I:2 * I] = gub[:, 0::2], gub[:, 1::2]
            bias[:, 2 * I:] = reader.get(p + "down_proj_bias", (E, H))
            progress(E * cfg.expert_numel * store.data.element_size())

    @classmethod
    def expert_tensors(cls, store) -> list[tuple[str, torch.Tensor]]:
        I, out = store.cfg.expert_intermediate_size, []
        for layer in store.layers:
            p, E = f"model.layers.{layer}.mlp.experts.", range(store.cfg.num_experts)
            gate = torch.stack([store.part(layer, e, "gate").t() for e in E])          # [E, H, I]
            up = torch.stack([store.part(layer, e, "up").t() for e in E])
            bias = store.bias(layer)
            out += [(p + "gate_up_proj", torch.stack((gate, up), dim=-1).flatten(-2)),  # [E, H, 2I] interleaved
                    (p + "gate_up_proj_bias", torch.stack((bias[:, :I], bias[:, I:2 * I]), dim=-1).flatten(-2)),
                    (p + "down_proj", torch.stack([store.part(layer, e, "down").t() for e in E])),
                    (p + "down_proj_bias", bias[:, 2 * I:])]
        return out
