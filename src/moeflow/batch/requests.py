"""Batch input lines (OpenAI Batch API JSONL, or plain {"prompt": ...}) into requests, and result records.

A line that cannot run becomes a result record of its own (Batch API format) and the job goes on: a line that
is not a request at all gets `error`, a request the API would refuse gets `response` with status 400.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from moeflow.server.protocol import APIError, ChatRequest, CompletionRequest, check_supported

URLS = {"/v1/chat/completions": True, "/v1/completions": False}  # url -> chat


@dataclass
class BatchRequest:
    """One runnable line: its custom_id, the endpoint and the validated body."""

    custom_id: str
    chat: bool
    body: ChatRequest | CompletionRequest
    line: int


def record(custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    """One output line in the Batch API's result format."""
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response, "error": error}


def failed(custom_id: str | None, code: str, message: str) -> dict:
    return record(custom_id, error={"code": code, "message": message})


def refused(custom_id: str, e: APIError) -> dict:
    return record(custom_id, response={"status_code": e.status, "request_id": uuid.uuid4().hex, "body": e.body()})


def ok(custom_id: str, body: dict) -> dict:
    return record(custom_id, response={"status_code": 200, "request_id": uuid.uuid4().hex, "body": body})


def _validation_message(e: ValidationError) -> str:
    err = (e.errors() or [{}])[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where + ': ' if where else ''}{err.get('msg', 'invalid request')}"


def parse_line(text: str, line: int) -> BatchRequest | dict:
    """A request, or the result record that stands for a line that cannot run."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        return failed(None, "invalid_json", f"line {line}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        return failed(None, "invalid_request", f"line {line}: not a JSON object")
    if "prompt" in obj and "body" not in obj:  # a plain {"prompt": ...} line, custom_id optional
        custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else f"line-{line}"
        url, body = "/v1/completions", {k: v for k, v in obj.items() if k != "custom_id"}
    else:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return failed(None, "missing_custom_id", f"line {line}: `custom_id` must be a non-empty string")
        url, body = obj.get("url"), obj.get("body")
        if obj.get("method", "POST") != "POST":
            return failed(custom_id, "invalid_method", f"line {line}: `method` must be POST")
        if url not in URLS:
            return failed(custom_id, "invalid_url",
                          f"line {line}: `url` must be one of {', '.join(URLS)} (got {url!r})")
        if not isinstance(body, dict):
            return failed(custom_id, "missing_body", f"line {line}: `body` must be a JSON object")
    chat = URLS[url]
    try:
        req = (ChatRequest if chat else CompletionRequest).model_validate(body)
        check_supported(req)
        if req.stream:
            raise APIError(400, "`stream` is not supported in a batch", param="stream")
    except ValidationError as e:
        return refused(custom_id, APIError(400, _validation_message(e)))
    except APIError as e:
        return refused(custom_id, e)
    return BatchRequest(custom_id, chat, req, line)


def engine_error(custom_id: str, message: str) -> dict:
    """A request the engine failed on (not the request's fault)."""
    return refused(custom_id, APIError(500, message))

