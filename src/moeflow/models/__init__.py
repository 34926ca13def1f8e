"""Architectures by `model_type`; adding one is one new file that registers itself (models/base.py's `register`)
and one name in the import below."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.models.base import ARCHITECTURES, Architecture, register  # noqa: F401  (the registry's API)


def get_architecture(model_type: str | None) -> type[Architecture]:
    if model_type not in ARCHITECTURES:
        raise MoeflowError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


from moeflow.models import (  # noqa: E402,F401  (registration)
    deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe)
