"""llama_trt.serve.tritonserver without starting a server: finding the wheel, preparing the
backend directory, the command line, and the one-line errors when a piece is missing."""

from __future__ import annotations

import shlex
import sys
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama_trt.cli import main
from llama_trt.errors import BackendUnavailableError
from llama_trt.serve import tritonserver as ts

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def fake_install(tmp: Path, stub_versions=(PY,)) -> ts.TritonInstall:
    """The wheel's layout (pytriton/tritonserver/...), with placeholder files."""
    root = tmp / "pytriton" / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_text("#!/bin/sh\n")
    py = root / "backends" / "python"
    py.mkdir(parents=True)
    (py / "libtriton_python.so").write_bytes(b"lib")
    (py / "triton_python_backend_utils.py").write_text("# utils\n")
    for v in stub_versions:
        (root / "python_backend_stubs" / v).mkdir(parents=True)
        (root / "python_backend_stubs" / v / "triton_python_backend_stub").write_bytes(f"stub {v}".encode())
    libs = tmp / "nvidia_pytriton.libs"
    libs.mkdir()
    return ts.TritonInstall(root, libs, "0.7.0")


def test_prepare_backends_copies_the_stub_for_this_python(tmp_path):
    install = fake_install(tmp_path, (PY, "3.8"))
    dest = ts.prepare_backends(install, tmp_path / "backends")
    py = dest / "python"
    assert (py / "triton_python_backend_stub").read_bytes() == f"stub {PY}".encode()
    assert (py / "triton_python_backend_stub").stat().st_mode & 0o111
    assert (py / "libtriton_python.so").read_bytes() == b"lib" and (py / "triton_python_backend_utils.py").is_file()
    assert sorted(p.name for p in dest.iterdir()) == ["python"]  # no temporary folder left
    assert ts.prepare_backends(install, dest) == dest  # reused as it is
    (py / "triton_python_backend_stub").write_bytes(b"stub of another python")
    ts.prepare_backends(install, dest)  # replaced, not trusted
    assert (py / "triton_python_backend_stub").read_bytes() == f"stub {PY}".encode()


def test_missing_stub_for_this_python_is_one_clear_error(tmp_path):
    install = fake_install(tmp_path, ("3.8",))
    with pytest.raises(BackendUnavailableError, match=rf"no python backend stub for Python {PY} \(it has 3.8\)"):
        ts.prepare_backends(install, tmp_path / "b")


def test_launch_spec_is_the_exact_command(tmp_path, monkeypatch):
    install = fake_install(tmp_path)
    monkeypatch.setattr(ts, "check_stub_numpy", lambda install: None)
    spec = ts.launch_spec(tmp_path / "repo", ["tiny_generate"], ports=ts.TritonPorts(18000, 18001, 18002),
                          install=install, backend_dir=tmp_path / "b")
    argv = list(spec.argv)
    assert argv[0] == str(install.binary)
    assert f"--model-repository={(tmp_path / 'repo').resolve()}" in argv
    assert f"--backend-directory={(tmp_path / 'b').resolve()}" in argv
    for flag in ("--model-control-mode=explicit", "--load-model=tiny_generate", "--http-address=127.0.0.1",
                 "--http-port=18000", "--grpc-address=127.0.0.1", "--grpc-port=18001", "--metrics-address=127.0.0.1",
                 "--metrics-port=18002"):
        assert flag in argv
    ld = spec.env["LD_LIBRARY_PATH"].split(":")
    assert ld[:2] == [str(ts.python_lib_dir()), str(install.libs)]
    assert spec.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    # the printed line runs as it reads: VAR=... prefix, then the argv, shell-quoted
    words = shlex.split(spec.command_line())
    assert words[:2] == [f"LD_LIBRARY_PATH={spec.env['LD_LIBRARY_PATH']}", f"PATH={spec.env['PATH']}"]
    assert words[2:] == argv
    assert spec.http_url == "http://127.0.0.1:18000"


def test_numpy_2_is_refused_for_the_stub(tmp_path, monkeypatch):
    install = fake_install(tmp_path)
    real = metadata.version
    monkeypatch.setattr(ts.metadata, "version", lambda n: "2.1.0" if n == "numpy" else real(n))
    with pytest.raises(BackendUnavailableError, match=r"numpy 2\.1\.0 .* numpy < 2"):
        ts.check_stub_numpy(install)
    monkeypatch.setattr(ts.metadata, "version", lambda n: "1.26.4" if n == "numpy" else real(n))
    ts.check_stub_numpy(install)


def test_without_the_wheel_triton_serve_says_how_to_install_and_package_still_works(tmp_path, monkeypatch,
                                                                                    tiny_export):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(ts.metadata, "distribution", missing)
    res = CliRunner().invoke(main, ["triton-serve", str(tmp_path), "--model", "x_generate"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: nvidia-pytriton is not installed")
    assert "llama-trt[triton]" in lines[0]
    res = CliRunner().invoke(main, ["package", str(tiny_export), "--triton", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    assert "tritonserver --model-repository=" in res.output and "note: nvidia-pytriton is not installed" in res.output
