"""Tokenizers (the `tokenizers` library), chat templates (jinja2, as transformers renders them), streaming
detokenization, and a synthetic byte-level BPE for checkpoints that have no trained tokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from moeflow import MoeflowError
from moeflow.config import read_json


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


class TextTokenizer:
    def __init__(self, tok: Tokenizer, config: dict):
        self.tok, self.config = tok, config
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values())))

    @classmethod
    def from_dir(cls, path: Path) -> TextTokenizer:
        if not (path / "tokenizer.json").exists():
            raise MoeflowError(f"{path} has no tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise MoeflowError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        if (path / "chat_template.jinja").exists():  # transformers 5 saves the template beside the config
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(tok, config)

    def save(self, path: Path) -> None:
        self.tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))

    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    @property
    def eos_ids(self) -> list[int]:
        eos = self._special("eos_token")
        i = self.tok.token_to_id(eos) if eos else None
        return [i] if i is not None else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.chat_template:
            raise MoeflowError("this checkpoint's tokenizer has no chat template; pass a plain prompt instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "")
        except jinja2.exceptions.TemplateError as e:
            raise MoeflowError(f"chat template: {e}") from None
        return self.encode(text, add_special_tokens=False)  # the template already holds BOS where wanted


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters.

    Decodes only a short window (the last emitted token onwards), so the cost per token stays constant."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix, self.read = 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""


MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def synthetic_tokenizer(vocab_size: int, specials: dict[str, int], bos: str | None, eos: str,
                        chat_template: str) -> TextTokenizer:
    """A byte-level BPE of exactly `vocab_size` ids, so that any id a random model emits decodes to text.

    Merges are generated, not trained: letters pair up into 2-, 3-, 4-... character tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(alphabet) + len(specials):
        raise MoeflowError(f"a byte-level tokenizer needs a vocabulary of at least {len(alphabet) + len(specials)}")
    vocab: dict[str, int] = dict(specials)
    free = (i for i in range(vocab_size) if i not in specials.values())
    for ch in alphabet:
        vocab[ch] = next(free)
    letters = [c for c in "etaoinshrdlucmfwypvbgkjqxz"]
    starts = ["Ġ" + c for c in letters] + letters + [c.upper() for c in letters]
    merges: list[tuple[str, str]] = []
    frontier = list(starts)
    for a, b in [("Ġ", c) for c in letters] + [(c, d) for c in letters for d in letters]:
        if a + b not in vocab and len(vocab) < vocab_size:
            vocab[a + b], merges = next(free), merges + [(a, b)]
    while len(vocab) < vocab_size:
        grown = []
        for stem in frontier:
            for c in letters:
                if len(vocab) >= vocab_size:
                    break
                if stem in vocab and stem + c not in vocab:
                    vocab[stem + c] = next(free)
                    merges.append((stem, c))
                    grown.append(stem + c)
        frontier = grown or [t for t in vocab if len(t) > 1]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])])
    config = {"bos_token": bos, "eos_token": eos, "chat_template": chat_template,
              "model_max_length": 1 << 20, "tokenizer_class": "PreTrainedTokenizerFast"}
    return TextTokenizer(tok, config)
