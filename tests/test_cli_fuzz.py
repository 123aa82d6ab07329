"""Property-based fuzzing of the CLI's numeric options (issue 16, item 10).

Whatever text a user passes to a numeric option -- huge or negative integers, nan/inf, floats
where ints belong, junk -- the command ends with exit 0, or exit 2 and exactly one ``error:``
line; never a traceback, never an "unexpected" exit 1. Each explicit ``@example`` is a case the
fuzz found that used to end in a traceback.
"""

from __future__ import annotations

import unittest.mock
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_trt.cli import main

BIG = 10**30
values = (st.integers(-(2**70), 2**70).map(str)
          | st.integers(-3, 300).map(str)
          | st.floats().map(str)  # nan, inf, -0.0, 1e+308 ...
          | st.sampled_from(["", " ", "1e3", "0x10", "1_000", "\u0663", "1.5", "--", "-0", "+7", str(2**64), str(BIG)])
          | st.text(max_size=4))
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clifuzz")
    for args in (["create-tiny", root / "ckpt"], ["export", root / "ckpt", "-o", root / "export", "--no-ort-check"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    return root / "export"


def assert_clean_exit(r) -> None:
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 2), r.output
    if r.exit_code == 2:
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.output


def _flags(options: dict) -> list[str]:
    return [x for name, value in options.items() for x in (name, value)]


RUN_OPTIONS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed",
               "--threads", "--stop-id"]


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={k: values for k in RUN_OPTIONS}), prompt_ids=values)
@example(options={}, prompt_ids=str(2**70))  # OverflowError: Python int too large to convert to C long
@example(options={"--seed": "-1"}, prompt_ids="1")
def test_run_numeric_options(export_dir, options, prompt_ids):
    args = ["run", str(export_dir), "--backend", "onnxruntime", "--prompt-ids", prompt_ids,
            "--max-new-tokens", "4", *_flags(options)]
    assert_clean_exit(CliRunner().invoke(main, args))


BENCH_OPTIONS = {
    "--batch": values, "--prompt-len": values, "--new-tokens": values, "--runs": st.sampled_from(["1", "0", "-1"]),
    "--warmup": st.sampled_from(["0", "-1", "x"]), "--threads": values,
    # large valid sizes allocate that much memory: only tiny or invalid ones here
    "--bandwidth-gib": st.floats(max_value=0.002).map(str) | st.sampled_from(["nan", "inf", "64.5", "x"]),
}


@settings(FUZZ, max_examples=20)
@given(options=st.fixed_dictionaries({}, optional=BENCH_OPTIONS))
@example(options={"--bandwidth-gib": "1e-300", "--new-tokens": "2"})  # ZeroDivisionError
@example(options={"--batch": str(BIG)})  # ValueError: Maximum allowed dimension exceeded
@example(options={"--prompt-len": str(BIG)})  # OverflowError building the prompt
def test_bench_numeric_options(export_dir, options):
    args = ["bench", str(export_dir), "--backend", "onnxruntime", "--runs", "1", "--warmup", "0",
            "--new-tokens", "2", "--prompt-len", "4", "--bandwidth-gib", "0", *_flags(options)]
    assert_clean_exit(CliRunner().invoke(main, args))


SERVE_OPTIONS = ["--port", "--max-batch", "--max-queue", "--threads", "--max-body-bytes", "--request-timeout",
                 "--shutdown-timeout"]


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={k: values for k in SERVE_OPTIONS}))
def test_serve_numeric_options(export_dir, options):
    """Options are checked before the server starts (the blocking serve() is replaced)."""
    with unittest.mock.patch("llama_trt.serve.server.serve", lambda *a, **k: None):
        r = CliRunner().invoke(main, ["serve", str(export_dir), *_flags(options)])
    assert_clean_exit(r)


@settings(FUZZ, max_examples=10)
@given(seed=values)
def test_create_tiny_seed(tmp_path_factory, seed):
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert_clean_exit(CliRunner().invoke(main, ["create-tiny", str(out), "--seed", seed]))


@pytest.mark.parametrize("option", ["--max-batch", "--max-seq", "--max-context"])
def test_build_dimensions_past_int32_are_one_error_line(export_dir, tmp_path, option):
    """Found by fuzzing: the TensorRT bindings raised a TypeError on a dimension >= 2**31."""
    r = CliRunner().invoke(main, ["build", str(export_dir), "-o", str(tmp_path / "e"), option, str(2**31)])
    assert_clean_exit(r)
    assert r.exit_code == 2 and option in r.output and not (tmp_path / "e").exists()
