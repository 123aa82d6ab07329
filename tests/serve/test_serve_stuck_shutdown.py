"""Issue 16, first row's last clause: "SIGTERM cannot stop the server while one [request] is stuck".

A model step that never returns (here: a session whose step blocks) must not keep the server
alive past ``--shutdown-timeout`` (plus the engine's own stop wait), and the request stuck in
it still gets an answer: its stream ends with an error event and ``[DONE]``.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
from serve_helpers import GatedSession, wait_for

MODEL = "tiny"


def test_sigterm_exits_while_a_step_is_stuck(tiny_export):
    import uvicorn

    from llama_trt.serve.app import create_app
    from llama_trt.serve.server import DrainingServer, build_engine, free_port
    from llama_trt.serve.settings import ServeSettings

    eng = build_engine(tiny_export, backend="onnxruntime", max_batch=2, max_queue=4, model_name=MODEL)
    gated = GatedSession(eng.session)
    eng.session = gated
    settings = ServeSettings(shutdown_timeout_s=0.5, request_timeout_s=None)  # no deadline to rescue it
    port = free_port()
    config = uvicorn.Config(create_app(eng, settings), host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    ds = DrainingServer(config.app, eng, config, settings.shutdown_timeout_s)
    server_thread = threading.Thread(target=ds.run, daemon=True)
    server_thread.start()
    lines: list[str] = []
    try:
        assert wait_for(lambda: ds.server.started, 30)
        gated.gate.clear()  # from now on every step blocks (GatedSession waits up to 30 s)

        def stream():
            body = {"model": MODEL, "prompt": "the cat", "max_tokens": 50, "stream": True}
            with httpx.Client(timeout=60) as c, \
                    c.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                lines.extend(ln for ln in r.iter_lines() if ln.startswith("data:"))

        client = threading.Thread(target=stream)
        client.start()
        assert wait_for(lambda: eng.active_count == 1 or eng.queue_depth == 1 or not client.is_alive(), 20)
        time.sleep(0.3)  # the step is now blocked inside the session
        t0 = time.perf_counter()
        ds.begin_drain()  # what SIGTERM calls
        server_thread.join(25)
        elapsed = time.perf_counter() - t0
        assert not server_thread.is_alive(), "the server did not exit while a step was stuck"
        assert elapsed < 20, elapsed  # shutdown timeout + the engine's 10 s stop wait, not the 30 s step
        client.join(10)
        assert lines and lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][5:])["error"]["code"] == "shutting_down", lines[-2]
    finally:
        gated.gate.set()
        eng.close()
