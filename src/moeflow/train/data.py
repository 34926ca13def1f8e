"""The demo model's corpus: text files from a folder, a fixed held-out split, a byte-level BPE trained on them,
and batches of fixed-length windows over the concatenated token stream.

Every document becomes `<s> text </s>`; the documents are concatenated in file order and cut into windows
of T+1 tokens (T inputs, T shifted targets), so a window may span a document boundary, as in GPT pretraining.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moeflow import MoeflowError
from moeflow.tokenizer import MIXTRAL_TEMPLATE, TextTokenizer

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Mixtral
SUFFIXES = (".txt", ".rst", ".md")
HELDOUT_ONE_IN = 24                  # ~4% of the files, chosen by a hash of their path: the same on every host


def is_heldout(rel_path: str) -> bool:
    return int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % HELDOUT_ONE_IN == 0


def read_corpus(root: Path) -> tuple[list[str], list[str], list[str]]:
    """-> (train texts, held-out texts, held-out relative paths), files in sorted path order."""
    if not root.is_dir():
        raise MoeflowError(f"corpus folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise MoeflowError(f"corpus folder {root} holds no {'/'.join(SUFFIXES)} files")
    train, heldout, heldout_names = [], [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        text = f.read_text(encoding="utf-8", errors="replace")
        if is_heldout(rel):
            heldout.append(text)
            heldout_names.append(rel)
        else:
            train.append(text)
    if not heldout:  # a tiny corpus (tests): hold out the last file rather than nothing
        heldout, heldout_names = [train.pop()], [files[-1].relative_to(root).as_posix()]
    return train, heldout, heldout_names


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization) with Mixtral's specials and [INST] chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MIXTRAL_TEMPLATE,
              "model_max_length": context, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False}
    return TextTokenizer(tok, config)


def token_stream(tokenizer: TextTokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream `<s> doc </s> <s> doc </s> ...` -> [n] int64."""
    eos = tokenizer.tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tokenizer.tok.encode_batch(texts, add_special_tokens=True):  # adds <s>; parallel in Rust
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, T: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping windows of T+1 tokens (consecutive windows share one token) -> [n, T+1]."""
    n = (stream.numel() - offset - 1) // T
    if n < 1:
        raise MoeflowError(f"the corpus has {stream.numel()} tokens, too few for one window of {T + 1}")
    starts = offset + torch.arange(n, device=stream.device) * T
    return stream[starts[:, None] + torch.arange(T + 1, device=stream.device)]


class Batches:
    """Shuffled batches of windows, epoch after epoch; each epoch cuts the stream at a new random offset."""

    def __init__(self, stream: torch.Tensor, T: int, batch_size: int, seed: int):
        self.stream, self.T, self.B = stream, T, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self._queue = 0, []
        self.per_epoch = (stream.numel() - T - 1) // T // batch_size  # batches in every epoch
        if self.per_epoch < 1:
            raise MoeflowError(f"the corpus has {stream.numel()} tokens, too few for one batch of "
                               f"{batch_size} x {T}")

    def __next__(self) -> torch.Tensor:
        if not self._queue:
            offset = int(torch.randint(0, self.T, (1,), generator=self.gen))
            w = windows(self.stream, self.T, offset)
            perm = torch.randperm(w.shape[0], generator=self.gen)[: self.per_epoch * self.B].to(w.device)
            self._queue = list(w[perm].split(self.B))
            self.epoch += 1
        return self._queue.pop(0)  # [B, T+1]

    def __iter__(self):
        return self
