"""Open an artifact as an :class:`Engine` and run the app under uvicorn (``llama-trt serve``)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

from .engine import Engine
from .settings import ServeSettings


def build_engine(artifact, *, backend: str = "auto", max_batch: int = 8, max_queue: int = 64,
                 model_name: str | None = None, tokenizer=None, **session_options) -> Engine:
    """Open ``artifact`` (export / engine / checkpoint) with the runtime's ``open_session`` and its tokenizer."""
    from ..runtime.artifact import resolve_artifact
    from ..runtime.sessions import open_session
    from ..runtime.tokenizer import load_tokenizer

    art = resolve_artifact(Path(artifact))
    session = open_session(art, backend, **session_options)
    if tokenizer is None:
        tok_path = art.tokenizer_path()
        tokenizer = load_tokenizer(tok_path) if tok_path is not None else None
    name = model_name or (art.path.stem if art.path.is_file() else art.path.resolve().name)
    return Engine(session, tokenizer, model_name=name, max_batch=max_batch, max_queue=max_queue,
                  describe=session.describe())


def serve(artifact, settings: ServeSettings | None = None, *, backend: str = "auto", max_batch: int = 8,
          max_queue: int = 64, model_name: str | None = None, log_level: str = "info") -> None:
    """Blocking: serve ``artifact`` until interrupted."""
    import uvicorn

    from .app import create_app

    settings = settings or ServeSettings()
    engine = build_engine(artifact, backend=backend, max_batch=max_batch, max_queue=max_queue,
                          model_name=model_name)
    app = create_app(engine, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
    finally:
        engine.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn on 127.0.0.1:<free port> in a thread with its own event loop."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def task_count(self) -> int:
        async def count():
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)


__all__ = ["BackgroundServer", "build_engine", "free_port", "serve"]
