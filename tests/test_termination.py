"""A SIGTERM whose exception Python swallows (it landed inside a weakref callback, as in a CI run
where it hit importlib's module-lock callback) must still stop the command before it publishes
its output, and the command must still exit 143."""

from __future__ import annotations

import gc
import os
import signal
import sys
import weakref

import click
import pytest

from llama_trt.cli_support import Cli
from llama_trt.outputs import move_into_place
from llama_trt.termination import SigtermHandler, Terminated, install


class _Thing:
    pass


def _sigterm_inside_a_weakref_callback() -> list:
    """Deliver SIGTERM to this process while Python runs a weakref callback: the handler's
    exception goes to ``sys.unraisablehook`` ("Exception ignored") and is dropped, not raised
    here. Returns the exceptions Python dropped."""
    dropped = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: dropped.append(u.exc_value)
    try:
        thing = _Thing()
        ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))  # noqa: F841 - kept alive
        del thing
        gc.collect()
    finally:
        sys.unraisablehook = hook
    return dropped


@pytest.fixture
def sigterm_handler():
    installed = install()
    assert installed is not None
    yield installed[0]
    signal.signal(signal.SIGTERM, installed[1])


def test_a_swallowed_sigterm_is_remembered(sigterm_handler):
    dropped = _sigterm_inside_a_weakref_callback()  # returns: the exception did not reach us
    assert [type(e) for e in dropped] == [Terminated]
    assert sigterm_handler.received


def test_a_swallowed_sigterm_does_not_publish_the_output(sigterm_handler, tmp_path):
    tmp, out = tmp_path / ".out.export-1", tmp_path / "out"
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes(b"x")
    _sigterm_inside_a_weakref_callback()
    with pytest.raises(Terminated) as e:
        move_into_place(tmp, out)
    assert e.value.code == 128 + signal.SIGTERM
    assert not out.exists() and tmp.exists()  # the command's finally removes tmp


def test_without_sigterm_the_output_is_published(sigterm_handler, tmp_path):
    tmp, out = tmp_path / ".out.export-1", tmp_path / "out"
    tmp.mkdir()
    move_into_place(tmp, out)
    assert out.is_dir() and not tmp.exists() and not sigterm_handler.received


def test_a_command_that_ran_on_after_a_swallowed_sigterm_exits_143(capsys):
    @click.group(cls=Cli)
    def cli():
        pass

    @cli.command()
    def work():
        _sigterm_inside_a_weakref_callback()
        click.echo("finished")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli.main(["work"], prog_name="llama-trt")
    assert e.value.code == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "finished" in captured.out and "error: terminated (SIGTERM)" in captured.err
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI puts the old handler back
    assert not isinstance(before, SigtermHandler)
