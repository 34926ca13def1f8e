"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

uvicorn starts answering at once; the model loads on a thread meanwhile (/health says 503, then 200). One
EngineWorker thread runs every request (continuous batching); the handlers only validate, encode and relay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeflow import MoeflowError
from moeflow.engine.llm_engine import LLMEngine
from moeflow.server.metrics import ServerMetrics
from moeflow.server.protocol import (APIError, ChatRequest, CompletionRequest, Reply, check_supported,
                                     error_body, sampling_params)
from moeflow.server.worker import EngineFailure, EngineWorker
from moeflow.server.worker import Request as Job

log = logging.getLogger("moeflow.server")
POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class Serving:
    """What the endpoints share: the engine worker once loaded, the limits, the metrics."""

    def __init__(self, load: Callable[[], LLMEngine], model_name: str, max_queue: int,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.load_fn, self.model_name, self.max_queue = load, model_name, max_queue
        self.on_load_error = on_load_error
        self.metrics = ServerMetrics()
        self.worker: EngineWorker | None = None
        self.error: str | None = None
        self.created = int(time.time())

    def load(self) -> None:
        try:
            engine = self.load_fn()
        except BaseException as e:  # noqa: BLE001 - reported by /health and the CLI
            self.error = str(e) if isinstance(e, MoeflowError) else f"{type(e).__name__}: {e}"
            if self.on_load_error:  # the CLI reports it and stops
                self.on_load_error(e)
            else:
                log.error("loading %s failed: %s", self.model_name, self.error)
            return
        worker = EngineWorker(engine, self.max_queue).start()
        self.metrics.attach(worker)
        self.worker = worker
        log.info("%s is ready: %d running sequences, %d queued, context %d", self.model_name,
                 worker.max_running, self.max_queue, engine.max_len)

    def ready_worker(self) -> EngineWorker:
        if self.worker is None:
            raise APIError(503, f"the model failed to load: {self.error}" if self.error else "the model is loading",
                           headers={"Retry-After": "5"})
        return self.worker

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")


def create_app(load: Callable[[], LLMEngine], model_name: str, max_queue: int = 64,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    serving = Serving(load, model_name, max_queue, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=serving.load, name="moeflow-load", daemon=True).start()
        yield
        if serving.worker is not None:
            serving.worker.stop()

    app = FastAPI(title="moeflow", lifespan=lifespan)
    app.state.serving = serving
    app.add_middleware(CountRequests, metrics=serving.metrics)
    _add_error_handlers(app)

    @app.get("/health")
    def health():
        if serving.worker is None:
            return JSONResponse({"status": "failed" if serving.error else "loading", "error": serving.error},
                                status_code=503)
        if not serving.worker.alive:
            return JSONResponse({"status": "failed", "error": "the engine thread has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": serving.model_name, "object": "model",
                                            "created": serving.created, "owned_by": "moeflow"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(serving, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _generate(serving, body, request, chat=True)

    return app


# -- one request ---------------------------------------------------------------------------------------
def _encode(engine: LLMEngine, body: CompletionRequest | ChatRequest, chat: bool) -> list[int]:
    try:
        if chat:
            return engine.encode([m.as_dict() for m in body.messages])  # messages: at least one (protocol)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: batched prompts are not supported", param="prompt")
            prompt = prompt[0]
        ids = engine.encode(prompt)
    except MoeflowError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    vocab = engine.ck.cfg.vocab_size
    if bad := [i for i in ids if not 0 <= i < vocab]:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
    return ids


def _max_tokens(body, chat: bool, n_prompt: int, limit: int) -> int:
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    n_new = asked if asked is not None else (limit - n_prompt if chat else 16)
    if n_prompt + max(n_new, 1) > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the request asks for "
                            f"{n_prompt + n_new} ({n_prompt} in the prompt, {n_new} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    return n_new


async def _generate(serving: Serving, body, request: Request, chat: bool):
    worker = serving.ready_worker()
    serving.check_model(body.model)
    check_supported(body)
    ids = await asyncio.to_thread(_encode, worker.engine, body, chat)  # a long prompt must not stall the loop
    params = sampling_params(body, _max_tokens(body, chat, len(ids), worker.engine.max_len))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event):  # worker thread -> this request's queue
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed (shutdown)
            pass

    job = Job(ids, params, emit)
    if not worker.submit(job, capacity=worker.max_running + serving.max_queue):
        raise APIError(429, f"the server is full ({worker.max_running} running, {serving.max_queue} queued); "
                            "retry later", headers={"Retry-After": "1"})
    reply = Reply(chat, serving.model_name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # The background cancel covers a client gone before the stream started (its finally never runs).
        return StreamingResponse(_sse(serving, worker, job, events, reply, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(worker.cancel, job))
    return await _whole(serving, worker, job, events, reply, request)


async def _whole(serving: Serving, worker, job: Job, events: asyncio.Queue, reply: Reply, request: Request):
    """A non-streamed request's reply once its last token is in; the client polled for on a clock meanwhile."""
    last = None  # the latest event: an aborted request's tokens are counted from it
    try:
        text, check_at = [], time.monotonic() + POLL_S
        while True:
            try:
                event = await asyncio.wait_for(events.get(), POLL_S)
            except TimeoutError:
                event = None
            if time.monotonic() >= check_at:  # tokens may never pause: check on a clock, not on silence
                check_at = time.monotonic() + POLL_S
                if await request.is_disconnected():
                    raise ClientGone()
            if event is None:
                continue
            if isinstance(event, EngineFailure):
                raise APIError(500, str(event))
            last = event
            text.append(event.text)
            if event.finished:
                serving.metrics.finished(event)
                return reply.whole("".join(text), event.finish_reason, event.prompt_tokens, event.generation_tokens)
    finally:
        worker.cancel(job)  # a no-op once finished; frees the slot when the client has gone
        if last is not None and not last.finished:
            serving.metrics.finished(last)


class ClientGone(Exception):
    pass


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(serving: Serving, worker: EngineWorker, job: Job, events: asyncio.Queue, reply: Reply,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels this (and the request)."""
    last = None
    try:
        if reply.chat:
            yield _data(reply.chunk(None, first=True, with_usage=include_usage))
        while True:
            event = await events.get()
            if isinstance(event, EngineFailure):
                yield _data(error_body(str(event), "server_error"))
                break
            last = event
            if event.text:
                yield _data(reply.chunk(event.text, with_usage=include_usage))
            if event.finished:
                serving.metrics.finished(event)
                yield _data(reply.chunk(None, event.finish_reason, with_usage=include_usage))
                if include_usage:
                    yield _data(reply.usage_chunk(event.prompt_tokens, event.generation_tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(job)
        if last is not None and not last.finished:  # the client went away: its tokens still count
            serving.metrics.finished(last)


# -- errors and request counts ---------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype and ctype != "application/json":
            message, loc = f"the body must be JSON sent as Content-Type: application/json, not {ctype}", []
        elif err.get("type") == "json_invalid":
            message, loc = "the body is not valid JSON", []
        elif err.get("type") == "missing" and not loc:
            message = f"the body is empty: send a JSON object with {_required(request.url.path)}"
        else:
            message = f"{where + ': ' if where else ''}{err.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, "invalid_request_error", loc[0] if loc else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


def _required(path: str) -> str:
    model = ChatRequest if path.endswith("chat/completions") else CompletionRequest
    return " and ".join(f"`{n}`" for n, f in model.model_fields.items() if f.is_required())


class CountRequests:
    """ASGI middleware: counts /v1 requests by endpoint and status (pure ASGI, so streaming stays untouched).
    A response whose body never completed (the client went away mid-stream) counts as 499, as a non-streamed
    one whose client went away does."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status, complete = [500], [False]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.count(scope["path"], status[0] if complete[0] or status[0] == 500 else 499)
