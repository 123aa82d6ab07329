"""Exports shared by the exporter tests: each tiny model is exported ONCE per session.

Exports take ~10 s each on 2 CPU cores (torch.export dominates), so variants are combined:
``gqa`` (4/2, plain RoPE), ``mqa_llama3_tied`` (1 KV head, llama3 rope scaling, tied
embeddings), ``mha_linear`` (4/4, linear rope scaling), ``partial_rotary`` (rotary_dim 8
of head_dim 16), ``stories260k`` (llama2.c, interleaved RoPE, GQA 8/4, tied).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_trt.config import RopeScaling

REPO = Path(__file__).resolve().parents[2]

VARIANTS = {
    "gqa": dict(),
    "mqa_llama3_tied": dict(num_kv_heads=1, tie_word_embeddings=True,
                            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
    "mha_linear": dict(num_kv_heads=4, rope_scaling=RopeScaling("linear", 2.0)),
}
# Not expressible for transformers' Llama: compared with our torch model instead.
PARTIAL_ROTARY_FACTOR = 0.5

FP16_REPORT: dict[str, float] = {}


@dataclass
class Exported:
    name: str
    checkpoint: Path
    out_dir: Path
    dtype: str

    @property
    def manifest(self):
        from llama_trt.exporter import load_manifest

        return load_manifest(self.out_dir)

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / "model.onnx"

    def session(self):
        from llama_trt.exporter.feeds import ort_session

        return ort_session(self.out_dir)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> tiny HF checkpoint folder (created lazily)."""
    from llama_trt.checkpoint import create_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            if name == "partial_rotary":
                path = create_tiny_checkpoint(root / name, seed=3)
                cfg = json.loads((path / "config.json").read_text())
                cfg["partial_rotary_factor"] = PARTIAL_ROTARY_FACTOR
                (path / "config.json").write_text(json.dumps(cfg))
            else:
                path = create_tiny_checkpoint(root / name, seed=len(made) + 1, **VARIANTS[name])
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoints, stories260k):
    """(name, dtype) -> Exported; each export runs once per session.

    The fp32 ``gqa`` export goes through the CLI (so the CLI success path is covered), the
    fp16 ``gqa`` export goes through the API with force=True over an existing folder.
    """
    from click.testing import CliRunner

    from llama_trt.cli import main
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("exports")
    done: dict[tuple[str, str], Exported] = {}
    background: dict[tuple[str, str], subprocess.Popen] = {}

    def start_background(name: str, ckpt: Path, dtype: str) -> None:
        # The 5-layer stories260K export takes ~20 s: run it on the second core through
        # the real command line (`python -m llama_trt.cli export`) while tests go on.
        out = root / f"{name}-{dtype}"
        log = open(root / f"{name}-{dtype}.log", "w")
        background[(name, dtype)] = subprocess.Popen(
            [sys.executable, "-m", "llama_trt.cli", "export", str(ckpt), "-o", str(out), "--dtype", dtype],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )

    def get(name: str, dtype: str = "fp32") -> Exported:
        key = (name, dtype)
        if ("stories260k", "fp32") not in background:
            start_background("stories260k", stories260k, "fp32")
        if key in done:
            return done[key]
        ckpt = stories260k if name == "stories260k" else checkpoints(name)
        out = root / f"{name}-{dtype}"
        if key in background:
            rc = background[key].wait(timeout=600)
            log = (root / f"{name}-{dtype}.log").read_text()
            assert rc == 0, f"background export of {name} failed:\n{log[-3000:]}"
            assert "model.onnx" in log
        elif key == ("gqa", "fp32"):
            res = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out), "--dtype", dtype])
            assert res.exit_code == 0, res.output + repr(res.exception)
            assert "model.onnx" in res.output
        elif key == ("gqa", "fp16"):
            out.mkdir()
            (out / "stale.txt").write_text("from an earlier run")
            (out / "manifest.json").write_text('{"kind": "llama_trt.onnx_export"}')  # --force replaces only ours
            export(ckpt, out, dtype=dtype, force=True)
            assert not (out / "stale.txt").exists(), "--force must replace the folder, not merge into it"
        else:
            export(ckpt, out, dtype=dtype)
        done[key] = Exported(name, Path(ckpt), out, dtype)
        return done[key]

    yield get
    for proc in background.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pytest_terminal_summary(terminalreporter):
    if FP16_REPORT:
        terminalreporter.section("fp16 export vs transformers fp32: max abs diff of logits (real tokens)")
        for name, diff in sorted(FP16_REPORT.items()):
            terminalreporter.write_line(f"{name}: {diff:.3e}")
