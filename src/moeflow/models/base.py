"""What an architecture file provides: the config mapping and the published tensor names."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moeflow.config import ModelConfig
from moeflow.models.layers import ExpertBackend, MoeTransformer

EXPERT_PARTS = ("gate", "up", "down")  # order of the three matrices inside one expert's block


class Architecture(ABC):
    model_type: str
    hf_class: str  # the transformers class that reads the same checkpoint, for config.json "architectures"

    @staticmethod
    @abstractmethod
    def config(hf: dict) -> ModelConfig:
        """Keep the fields moeflow uses from a Hugging Face config.json dict."""

    @staticmethod
    @abstractmethod
    def hf_config(cfg: ModelConfig) -> dict:
        """The inverse, for writing synthetic checkpoints that transformers can load."""

    @staticmethod
    @abstractmethod
    def expert_name(layer: int, expert: int, part: str) -> str:
        """Published tensor name of one routed expert's gate, up or down matrix."""

    @staticmethod
    def hf_name(name: str) -> str:
        """Published tensor name of a MoeTransformer parameter (checkpoint renaming lives here, per model)."""
        return name if name.startswith("lm_head") else "model." + name

    @classmethod
    def load_experts(cls, reader, store, progress) -> None:
        """Fill the ExpertStore from a checkpoint's TensorReader, calling progress(bytes) as it goes (an
        architecture that publishes its experts fused overrides this)."""
        I, H = store.cfg.expert_intermediate_size, store.cfg.hidden_size
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        for layer in store.layers:
            for e in range(store.cfg.num_experts):  # set_expert quantizes where the store is quantized
                store.set_expert(layer, e, *(reader.get(cls.expert_name(layer, e, part), shapes[part])
                                             for part in EXPERT_PARTS))
                progress(store.expert_bytes)

    @classmethod
    def expert_tensors(cls, store) -> list[tuple[str, torch.Tensor]]:
        """(published name, tensor) of every routed expert weight, for writing a checkpoint."""
        return [(cls.expert_name(layer, e, part), store.part(layer, e, part))
                for layer in store.layers for e in range(store.cfg.num_experts) for part in EXPERT_PARTS]

    @staticmethod
    def build(cfg: ModelConfig, experts: ExpertBackend) -> MoeTransformer:
        return MoeTransformer(cfg, experts)


ARCHITECTURES: dict[str, type[Architecture]] = {}  # by model_type; models/__init__.py imports every file that adds one


def register(cls: type[Architecture]) -> type[Architecture]:
    ARCHITECTURES[cls.model_type] = cls
    return cls
