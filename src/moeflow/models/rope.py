"""RoPE variants by rope type: each maps (rotary dim, theta, scaling parameters, max positions) to the inverse
frequencies and the factor cos/sin are multiplied by. YaRN: arXiv 2309.00071 (DeepSeek's mscale form)."""

from __future__ import annotations

import math

import torch

from moeflow import MoeflowError


def default_rope(dim: int, theta: float, params: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope(dim: int, theta: float, params: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """Frequencies below the original context's rotations interpolated by `factor`, above it kept, a linear ramp
    between (beta_fast/beta_slow rotations); cos/sin scaled by mscale / mscale_all_dim."""
    orig = params.get("original_max_position_embeddings")
    if orig is None:
        raise MoeflowError("rope_scaling type 'yarn' needs original_max_position_embeddings")
    factor = params.get("factor") or max_pos / orig
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    attn = params.get("attention_factor")
    if attn is None:
        attn = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 1e-3)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolate = 1 - ramp  # 1: the original frequency kept, 0: interpolated
    inv_freq = (1.0 / (factor * pos)) * ramp + (1.0 / pos) * extrapolate
    return inv_freq, float(attn)


ROPE_TYPES = {"default": default_rope, "yarn": yarn_rope}


def rope_from_hf(hf: dict, supported: tuple[str, ...] = tuple(ROPE_TYPES)) -> tuple[float, tuple]:
    """(theta, scaling parameters as sorted items) from config.json's rope_scaling (transformers 4) or
    rope_parameters (transformers 5); a type outside `supported` is a MoeflowError naming it."""
    params = dict(hf.get("rope_parameters") or {}) | dict(hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in supported:
        raise MoeflowError(f"unsupported RoPE type {rope_type!r} in config.json (model_type {hf.get('model_type')!r});"
                           f" moeflow supports {', '.join(repr(t) for t in supported)} here")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    params = {k: v for k, v in params.items() if k not in ("rope_theta", "type")} | {"rope_type": rope_type}
    return theta, tuple(sorted(params.items()))


def rope_tables(scaling: tuple, dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin factor of a ModelConfig's rope_scaling items."""
    params = dict(scaling)
    return ROPE_TYPES[params.get("rope_type", "default")](dim, theta, params, max_pos)


def softmax_scale_mscale(scaling: tuple) -> float:
    """DeepSeek's YaRN also scales the softmax by mscale(factor, mscale_all_dim)^2 (every dim, not only rope's)."""
    params = dict(scaling)
    if params.get("rope_type", "default") == "default" or not params.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(params.get("factor") or 1.0, params["mscale_all_dim"]) ** 2
