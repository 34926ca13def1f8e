"""`moeflow serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

from collections.abc import Callable


def run_server(load: Callable, model_name: str, host: str, port: int, max_queue: int,
               log_level: str = "info") -> int:
    """Serve until interrupted; 2 when the model failed to load (the server then stops by itself)."""
    import uvicorn

    from moeflow.server.app import create_app

    server: uvicorn.Server | None = None

    def stop(_e: BaseException) -> None:
        server.should_exit = True

    app = create_app(load, model_name, max_queue, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run()
    error = app.state.serving.error
    if error:
        from moeflow import MoeflowError
        raise MoeflowError(error)
    return 0
