"""BatchJob: requests through an engine's continuous batching, results out as they finish.

The engine (LLMEngine, or any with add_request / step / has_unfinished / encode / max_len) is kept full: a
waiting request joins as soon as a running one finishes. Results leave in completion order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from moeflow.batch.requests import BatchRequest, engine_error, ok, refused
from moeflow.server.app import _encode, _max_tokens
from moeflow.server.protocol import APIError, Reply, sampling_params


@dataclass(frozen=True)
class Defaults:
    """Sampling fields filled in where a request leaves them unset (None: the API's own default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def apply(self, req: BatchRequest) -> BatchRequest:
        body = req.body
        update = {k: v for k, v in vars(self).items() if v is not None and getattr(body, k) is None}
        if req.chat and body.max_completion_tokens is not None:
            update.pop("max_tokens", None)
        if update:
            req.body = body.model_copy(update=update)
        return req


@dataclass
class JobStats:
    ok: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.elapsed_s, 1e-9)


@dataclass
class _Running:
    req: BatchRequest
    reply: Reply
    seq: object  # the engine's Sequence (its text, stop strings applied)


class BatchJob:
    def __init__(self, engine, model_name: str, defaults: Defaults = Defaults(), queue: int | None = None):
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.queue = queue or engine.cache.max_seqs  # requests encoded ahead of a free slot
        self.stats = JobStats()

    def run(self, items: Iterable[BatchRequest | dict], emit: Callable[[dict], None]) -> JobStats:
        """Every item through the engine; `emit` gets each result record (error records as they come)."""
        items, live = iter(items), {}
        more = True
        while more or self.engine.has_unfinished:
            while more and len(self.engine.waiting) < self.queue:
                item = next(items, None)
                if item is None:
                    more = False
                elif isinstance(item, dict):
                    self._emit(emit, item)
                else:
                    self._admit(item, live, emit)
            for r in self.engine.step() if self.engine.has_unfinished else ():
                self.stats.generated_tokens += 1  # a step's response is one token
                if r.finished:
                    run = live.pop(r.seq_id)
                    self.stats.prompt_tokens += r.prompt_tokens
                    body = run.reply.whole(run.seq.text, r.finish_reason, r.prompt_tokens, r.generation_tokens)
                    self._emit(emit, ok(run.req.custom_id, body))
        return self.stats

    def _admit(self, req: BatchRequest, live: dict, emit: Callable[[dict], None]) -> None:
        req = self.defaults.apply(req)
        try:
            ids = _encode(self.engine, req.body, req.chat)
            params = sampling_params(req.body, _max_tokens(req.body, req.chat, len(ids), self.engine.max_len))
        except APIError as e:
            return self._emit(emit, refused(req.custom_id, e))
        except Exception as e:  # noqa: BLE001 - one request's failure is its own record
            return self._emit(emit, engine_error(req.custom_id, f"{type(e).__name__}: {e}"))
        seq = self.engine.add_request(ids, params)
        live[seq.id] = _Running(req, Reply(req.chat, self.model_name), seq)

    def _emit(self, emit: Callable[[dict], None], rec: dict) -> None:
        good = rec["response"] is not None and rec["response"]["status_code"] == 200
        self.stats.ok += good
        self.stats.errors += not good
        emit(rec)

    def results(self, items: Iterable[BatchRequest | dict]) -> Iterator[dict]:
        """The records of `items`, all at once (for callers without a sink, e.g. Ray Data)."""
        out: list[dict] = []
        self.run(items, out.append)
        yield from out
