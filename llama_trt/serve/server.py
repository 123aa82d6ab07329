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
                 model_name: str | None = None, tokenizer=None, tokenizer_path=None, chat_template_file=None,
                 **session_options) -> Engine:
    """Open ``artifact`` (export / engine / checkpoint) with the runtime's ``open_session`` and its tokenizer
    (``tokenizer``; else the one at ``tokenizer_path`` or next to the artifact, with ``chat_template_file``)."""
    from ..runtime.artifact import resolve_artifact
    from ..runtime.sessions import open_session
    from ..runtime.tokenizer import open_tokenizer

    art = resolve_artifact(Path(artifact))
    if tokenizer is None:
        tokenizer = open_tokenizer(art.tokenizer_path(), tokenizer_path, chat_template_file)
    session = open_session(art, backend, **session_options)
    name = model_name or (art.path.stem if art.path.is_file() else art.path.resolve().name)
    return Engine(session, tokenizer, model_name=name, max_batch=max_batch, max_queue=max_queue,
                  describe=session.describe())


def describe_engine(engine: Engine) -> str:
    """One start-up line: which model, backend, precision and context this server runs."""
    info = engine.info
    precision = info.get("precision") or info.get("dtype") or info.get("kv_dtype") or "?"
    return (f"serving '{engine.model_name}' · backend {info.get('backend', '?')} · precision {precision} · "
            f"context {engine.max_context} · max batch {engine.max_batch}")


class DrainingServer:
    """uvicorn whose first SIGTERM/SIGINT drains instead of cutting: the engine stops admitting
    (503), running requests get ``shutdown_timeout_s`` to finish, then every request still open
    ends with an error event (streams: an error chunk, then ``[DONE]``) and the server exits.
    A second signal exits at once."""

    def __init__(self, app, engine: Engine, config, shutdown_timeout_s: float) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                outer.begin_drain(sig, frame)

        self.engine, self.shutdown_timeout_s = engine, float(shutdown_timeout_s)
        self.server = _Server(config)
        self._draining = False
        self._base_exit = uvicorn.Server.handle_exit

    def begin_drain(self, sig=None, frame=None) -> None:
        if self._draining:  # second signal: stop now
            self.engine.stop(timeout=1.0)
            self.server.should_exit = self.server.force_exit = True
            return
        self._draining = True
        self.engine.drain()
        threading.Thread(target=self._drain, name="llama-trt-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout_s
        while not self.engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.engine.stop()  # whatever still runs gets its error event now
        self.server.should_exit = True

    def run(self) -> None:
        self.server.run()


def serve(artifact, settings: ServeSettings | None = None, *, backend: str = "auto", max_batch: int = 8,
          max_queue: int = 64, model_name: str | None = None, log_level: str = "info", threads: int | None = None,
          max_context: int | None = None, tokenizer_path=None, chat_template_file=None) -> None:
    """Blocking: serve ``artifact`` until SIGTERM / Ctrl-C (drained, see :class:`DrainingServer`).
    ``max_context``: serve a context below the artifact's (the KV cache is sized to it)."""
    import logging

    import uvicorn

    from .app import create_app

    settings = settings or ServeSettings()
    engine = build_engine(artifact, backend=backend, max_batch=max_batch, max_queue=max_queue,
                          model_name=model_name, threads=threads, tokenizer_path=tokenizer_path,
                          chat_template_file=chat_template_file,
                          **({"max_context": max_context} if max_context else {}))
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    log = logging.getLogger("uvicorn.error")
    try:
        config.load()  # sets up uvicorn's logging, so the line below shows
        log.info(describe_engine(engine))
        DrainingServer(app, engine, config, settings.shutdown_timeout_s).run()
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
