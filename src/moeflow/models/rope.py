"""RoPE frequency tables by rope type, as transformers computes them (modeling_rope_utils).

Each function maps (head_dim, rope_theta, scaling parameters, max_position_embeddings) to RopeTable: the inverse
frequencies and the factor that multiplies cos and sin. Legend: D = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeflow import MoeflowError


@dataclass(frozen=True)
class RopeTable:
    inv_freq: torch.Tensor           # [D/2] fp32
    scale: float = 1.0               # cos and sin multiplied by this
    long_scale: float | None = None  # longrope: the scale once a call reaches past `switch_at` positions
    switch_at: int = 0


def _base(D: int, theta: float) -> torch.Tensor:
    return theta ** (torch.arange(0, D, 2, dtype=torch.float) / D)  # [D/2]


def default(D: int, theta: float, p: dict, max_pos: int) -> RopeTable:
    return RopeTable(1.0 / _base(D, theta))


def longrope(D: int, theta: float, p: dict, max_pos: int) -> RopeTable:
    """Phi-3.5 (arXiv:2402.13753) as transformers' Phimoe runs it: the short factors at every length, the cos/sin
    scale short_mscale, or long_mscale once the call's longest position passes original_max_position_embeddings."""
    orig = p["original_max_position_embeddings"]
    inv = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float) * _base(D, theta))
    if "short_mscale" in p and "long_mscale" in p:
        return RopeTable(inv, float(p["short_mscale"]), float(p["long_mscale"]), orig)
    factor = p.get("factor") or max_pos / orig
    scale = p.get("attention_factor") or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig)))
    return RopeTable(inv, float(scale))


def yarn(D: int, theta: float, p: dict, max_pos: int) -> RopeTable:
    """YaRN (arXiv:2309.00071): interpolated low frequencies, extrapolated high ones, a linear ramp between;
    cos/sin scaled by attention_factor (0.1 ln(factor) + 1 by default)."""
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig
    scale = p.get("attention_factor")
    if scale is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        scale = yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all else yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return D * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(fast), corr_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [D/2]
    extrap = 1 - ramp
    pos = _base(D, theta)
    inv = (1.0 / (factor * pos)) * (1 - extrap) + (1.0 / pos) * extrap
    return RopeTable(inv, float(scale))


ROPE_TYPES = {"default": default, "longrope": longrope, "yarn": yarn}


def rope_table(D: int, theta: float, scaling: tuple, max_pos: int) -> RopeTable:
    """scaling: ModelConfig.rope_scaling, () for plain RoPE."""
    p = dict(scaling)
    kind = p.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise MoeflowError(f"unsupported RoPE type {kind!r}; moeflow supports {', '.join(ROPE_TYPES)}")
    return ROPE_TYPES[kind](D, theta, p, max_pos)


def rope_scaling_from_hf(hf: dict, supported: tuple[str, ...]) -> tuple:
    """The scaling parameters of a config.json (transformers 4 `rope_scaling` or 5 `rope_parameters`) as sorted
    hashable pairs, () for plain RoPE; a type outside `supported` is an error naming it."""
    p = dict(hf.get("rope_parameters") or {}) | dict(hf.get("rope_scaling") or {})
    kind = p.pop("type", None) or p.get("rope_type") or "default"
    if kind == "default":
        return ()
    if kind not in supported:
        raise MoeflowError(f"unsupported RoPE type {kind!r} for model_type {hf.get('model_type')!r}; "
                           f"supported: default, {', '.join(supported)}")
    p = {k: tuple(v) if isinstance(v, list) else v for k, v in p.items() if k != "rope_theta"}
    if "original_max_position_embeddings" not in p and "original_max_position_embeddings" in hf:
        p["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return tuple(sorted((p | {"rope_type": kind}).items()))


def rope_from_hf(hf: dict, supported: tuple[str, ...] = ("yarn",)) -> tuple[float, tuple]:
    """(theta, scaling parameters) of a config.json; a type outside `supported` is an error naming it."""
    params = dict(hf.get("rope_parameters") or {}) | dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return theta, rope_scaling_from_hf(hf, supported)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale_mscale(scaling: tuple) -> float:
    """DeepSeek's YaRN also scales the softmax by mscale(factor, mscale_all_dim)^2 (every dim, not only rope's)."""
    params = dict(scaling)
    if params.get("rope_type", "default") == "default" or not params.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(params.get("factor") or 1.0, params["mscale_all_dim"]) ** 2
