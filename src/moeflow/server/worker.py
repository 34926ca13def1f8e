"""EngineWorker: the one thread that owns the LLMEngine and loops step() (continuous batching).

Requests come in through a locked inbox and join the running batch at the next step; each step's tokens go
back to their request through its `emit` callback (the server passes one that hands them to an asyncio queue).
A cancel (client gone) aborts the sequence between steps, which frees its KV slot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from moeflow.engine.llm_engine import GenerationResponse, LLMEngine
from moeflow.engine.sequence import SamplingParams, Sequence

log = logging.getLogger("moeflow.server")


class EngineFailure(Exception):
    """Delivered to a request in place of a response when the engine could not run it."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[GenerationResponse | EngineFailure], None]  # called on the worker thread
    seq: Sequence | None = field(default=None, repr=False)
    done: bool = False


class EngineWorker:
    def __init__(self, engine: LLMEngine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.max_running = engine.cache.max_seqs  # KV slots: sequences that run at once
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._by_seq: dict[int, Request] = {}
        self.active = 0  # submitted and not yet finished
        self.steps = self.step_seqs = 0  # engine steps run, and the sequences they ran (mean batch = ratio)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moeflow-engine", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- called from any thread ------------------------------------------------------------------------
    def submit(self, req: Request, capacity: int) -> bool:
        """Queue a request; False (nothing queued) when `capacity` requests are already in."""
        with self._cv:
            if self.active >= capacity:
                return False
            self.active += 1
            self._inbox.append(req)
            self._cv.notify()
        return True

    def cancel(self, req: Request) -> None:
        with self._cv:
            if not req.done:
                self._cancels.append(req)
                self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.waiting) + len(self._inbox)

    # -- the worker thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._cancels or self.engine.has_unfinished or self._stop):
                    self._cv.wait()
                if self._stop:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for req in inbox:
                self._add(req)
            for req in cancels:
                if not req.done:
                    if req.seq is not None:
                        self.engine.abort(req.seq)
                    self._finish(req)
            if self.engine.has_unfinished:
                self._step()
        for req in list(self._by_seq.values()):
            self._fail(req, "the server is shutting down")

    def _add(self, req: Request) -> None:
        try:
            req.seq = self.engine.add_request(req.prompt_ids, req.params)
        except Exception as e:  # noqa: BLE001 - the request is refused, the worker carries on
            self._fail(req, str(e))
            return
        self._by_seq[req.seq.id] = req

    def _step(self) -> None:
        try:
            responses = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("engine step failed")
            for req in list(self._by_seq.values()):
                self.engine.abort(req.seq)
                self._fail(req, f"the engine failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        self.step_seqs += len(responses)
        for r in responses:
            req = self._by_seq.get(r.seq_id)
            if req is None:
                continue
            req.emit(r)
            if r.finished:
                self._finish(req)

    def _fail(self, req: Request, message: str) -> None:
        req.emit(EngineFailure(message))
        self._finish(req)

    def _finish(self, req: Request) -> None:
        with self._cv:
            if req.done:
                return
            req.done = True
            self.active -= 1
        if req.seq is not None:
            self._by_seq.pop(req.seq.id, None)
