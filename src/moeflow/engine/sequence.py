"""Per-request state: sampling parameters, tokens, streamed text, timings."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from enum import Enum

import torch

from moeflow.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: TextTokenizer):
        self.id = next(_ids)
        self.prompt_ids, self.params = list(prompt_ids), params
        self.output_ids: list[int] = []
        self.status, self.slot, self.num_cached = Status.WAITING, -1, 0
        self.finish_reason: str | None = None
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text, self.emitted = "", 0  # text so far; how much of it has been streamed
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.t_arrival = time.perf_counter()
        self.t_start = self.t_first = self.t_end = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def new_tokens(self) -> list[int]:
        """Tokens not yet in the KV cache: the whole prompt at first, then the last sampled token."""
        return self.tokens[self.num_cached:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> str:
        """Add a sampled token; returns the text that may be streamed now (stop strings held back)."""
        self.output_ids.append(token)
        self.text += self.detok.push(token)
        stops = self.params.stop
        hits = [i for i in (self.text.find(s) for s in stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish("stop")
        # Hold back a tail that could still grow into a stop string.
        hold = 0 if self.finished else max(
            (n for s in stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        delta = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(delta)
        return delta

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason, self.t_end = Status.FINISHED, reason, time.perf_counter()

    def flush(self) -> str:
        """Text held back for stop strings, released once the sequence ends without one."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
