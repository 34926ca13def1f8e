"""A slot KV cache: each running sequence owns one slot of `max_len` positions in every layer."""

from __future__ import annotations

import torch

from moeflow import MoeflowError
from moeflow.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seqs: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.max_seqs, self.max_len = max_seqs, max_len
        # Per layer the architecture's two tensors of one token (K and V [Hkv, D], or MLA's latent and rope key)
        shapes = [(max_seqs, max_len, *s) for s in cfg.kv_token_shapes]  # [S, T, ...]
        # Zeros, not empty: masked positions still enter attn @ V, and 0 x NaN from stale memory is NaN.
        try:
            self.layers = [tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
                           for _ in range(cfg.num_hidden_layers)]
        except torch.OutOfMemoryError:
            need = cfg.kv_bytes_per_token(dtype) * max_seqs * max_len
            raise MoeflowError(f"no room for a KV cache of {max_seqs} x {max_len} tokens ({need / 2**30:.1f} GiB) "
                               f"on {device}") from None
        self.free = list(range(max_seqs - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def allocate(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]
