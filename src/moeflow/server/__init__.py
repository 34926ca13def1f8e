"""`moeflow serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import socket
from collections.abc import Callable

from moeflow import MoeflowError
from moeflow.flags import DEFAULT_MODEL, ENGINE, context_flag, device_flags, gpus_flag, model_flag


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, streaming, metrics); "
                        "requests' sampling defaults are the OpenAI API's (temperature 1)")
    model_flag(sv)
    sv.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    sv.add_argument("--max-running", type=int, default=ENGINE.max_running,
                    help="sequences decoded together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429")
    context_flag(sv, "prompt + generated tokens per request (default: the model's context, at most 4096 "
                     "with several sequences or --gpu-memory)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's and moeflow's log level")
    device_flags(sv)
    gpus_flag(sv)
    sv.set_defaults(func=run)


def run(args) -> int:
    from moeflow.dist.cli import spread
    from moeflow.launch import load_engine

    if (rc := spread(args)) is not None:  # --gpus: on the ranks
        return rc
    if args.max_queue < 0:
        raise MoeflowError("--max-queue must be at least 0")
    name = args.served_model_name or args.model or DEFAULT_MODEL
    return run_server(lambda: load_engine(args, args.max_running), name, args.host, args.port,
                      args.max_queue, args.log_level)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken or invalid port is one line, not uvicorn's
    traceback and an abort from the loader thread."""
    if not 1 <= port <= 65535:
        raise MoeflowError(f"--port {port} is not a TCP port (1-65535)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise MoeflowError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MoeflowError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run_server(load: Callable, model_name: str, host: str, port: int, max_queue: int,
               log_level: str = "info") -> int:
    """Serve until interrupted; 2 when the model failed to load (the server then stops by itself)."""
    sock = bind(host, port)
    import uvicorn

    from moeflow.server.app import create_app

    server: uvicorn.Server | None = None

    def stop(_e: BaseException) -> None:
        server.should_exit = True

    app = create_app(load, model_name, max_queue, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run(sockets=[sock])
    error = app.state.serving.error
    if error:
        raise MoeflowError(error)
    return 0
