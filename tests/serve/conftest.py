"""Serving fixtures: one tiny export with a word-level tokenizer, one real uvicorn server."""

from __future__ import annotations

import pytest
from serve_helpers import ServerThread, write_tokenizer

MODEL = "tiny"


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """create_tiny_checkpoint + a tokenizer with a chat template, exported once (fp32 ONNX)."""
    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("serve")
    ckpt = create_tiny_checkpoint(root / "ckpt", seed=0)
    write_tokenizer(ckpt)
    out = root / MODEL
    export(ckpt, out)
    return out


@pytest.fixture(scope="session")
def engine(tiny_export):
    from llama_trt.serve.server import build_engine

    eng = build_engine(tiny_export, backend="onnxruntime", max_batch=8, max_queue=256, model_name=MODEL)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def server(engine):
    """The app over a real uvicorn server on 127.0.0.1 (free port), stopped at the end."""
    from llama_trt.serve.app import create_app
    from llama_trt.serve.settings import ServeSettings

    app = create_app(engine, ServeSettings(max_body_bytes=64 * 1024))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="session")
def run_cli(tiny_export):
    """`llama-trt run ... --json` through click's CliRunner; returns the parsed JSON."""
    import json

    from click.testing import CliRunner

    from llama_trt.cli import main

    def run(*args):
        res = CliRunner().invoke(main, ["run", str(tiny_export), "--backend", "onnxruntime", *args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout.strip().splitlines()[-1])

    return run
