"""Find, prepare, start and stop a real ``tritonserver`` (the one shipped in the PyPI wheel
``nvidia-pytriton``), for a model repository written by ``llama-trt package --triton``.

Only the wheel's *binary* is used (under ``pytriton/tritonserver/``, shared libraries in
``nvidia_pytriton.libs/``), never PyTriton's Python model API. What it takes to run it:

* ``LD_LIBRARY_PATH``: the wheel's ``nvidia_pytriton.libs`` and the running interpreter's
  lib folder (the python backend stub links ``libpython3.X.so``; the interpreter's folder
  first, so the stub embeds *this* Python).
* ``PATH`` starting with this interpreter's folder: the stub's embedded Python runs isolated
  (``PYTHONPATH`` ignored; the generate model adds it back) and takes its prefix from the
  first ``python3`` on PATH, so a venv's site-packages (and its numpy) are the ones it sees.
* numpy < 2 in that environment: the wheel's stub was built before numpy 2 and hands the
  model corrupted tensors under numpy 2 (nvidia-pytriton's own requirements pin numpy < 2).
* a backend directory whose ``python/`` holds ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for this
  Python (the wheel keeps one per version in ``python_backend_stubs/<major.minor>/``): the
  backend runs the stub found next to its library. The wheel's own folder may be read-only
  and is shared by every Python, so the backend directory is a copy (:func:`prepare_backends`).

:class:`TritonServer` starts the binary in a new process group (explicit model control,
HTTP/gRPC/metrics on loopback unless told otherwise), waits for ``/v2/health/ready`` and
stops it with SIGTERM by PID (SIGKILL to the group after a timeout). Imports nothing
outside the standard library.
"""

from __future__ import annotations

import filecmp
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..errors import BackendUnavailableError, LlamaTrtError

WHEEL = "nvidia-pytriton"
INSTALL_HINT = "pip install 'llama-trt[triton]' (the nvidia-pytriton wheel ships tritonserver)"


class TritonServerError(LlamaTrtError):
    """tritonserver failed to start, to become ready, or to stop."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel put tritonserver. ``root``: ``.../pytriton/tritonserver``."""

    root: Path
    libs: Path
    version: str

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python: tuple[int, int] | None = None) -> Path:
        major, minor = python or sys.version_info[:2]
        stub = self.root / "python_backend_stubs" / f"{major}.{minor}" / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in (self.root / "python_backend_stubs").iterdir() if p.is_dir())
            raise BackendUnavailableError(f"{WHEEL} {self.version} has no python backend stub for Python "
                                          f"{major}.{minor} (it has {', '.join(have) or 'none'}); run "
                                          "tritonserver's python models with one of those Pythons")
        return stub


def find_tritonserver() -> TritonInstall:
    """The tritonserver of the installed ``nvidia-pytriton`` wheel (found without importing it)."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise BackendUnavailableError(f"{WHEEL} is not installed, so there is no tritonserver to start: "
                                      f"{INSTALL_HINT}") from None
    root = Path(dist.locate_file("pytriton/tritonserver"))
    libs = Path(dist.locate_file("nvidia_pytriton.libs"))
    install = TritonInstall(root, libs, dist.version)
    if not install.binary.is_file() or not libs.is_dir():
        raise BackendUnavailableError(f"{WHEEL} {dist.version} at {root.parent.parent} has no {install.binary.name} "
                                      f"binary (or no {libs.name}); reinstall it: {INSTALL_HINT}")
    return install


def python_lib_dir() -> Path:
    """The folder of the running interpreter's shared ``libpython`` (the stub links it)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BackendUnavailableError(
            f"this Python ({sys.executable}) has no shared libpython, which Triton's python backend stub needs; "
            "use a Python built with --enable-shared (distribution, pyenv with PYTHON_CONFIGURE_OPTS, conda)")
    return Path(sysconfig.get_config_var("LIBDIR"))


def check_stub_numpy(install: TritonInstall) -> None:
    """The wheel's stub exchanges tensors through pybind11 builds that predate numpy 2 (its
    arrays come out with broken strides under numpy 2: every string input is garbage), so
    the interpreter it embeds must have numpy < 2, as nvidia-pytriton's own requirements say."""
    try:
        version = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        raise BackendUnavailableError("numpy is not installed; Triton's python backend needs it: "
                                      f"{INSTALL_HINT}") from None
    if int(version.split(".")[0]) >= 2:
        raise BackendUnavailableError(
            f"numpy {version} is installed, but the python backend stub of {WHEEL} {install.version} works with "
            "numpy < 2 only (its tensors arrive corrupted): install numpy<2 in this environment "
            f"(pip install 'numpy<2', which {INSTALL_HINT.split(' (')[0]} does), e.g. in a venv for serving")


def default_backend_dir(install: TritonInstall) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    major, minor = sys.version_info[:2]
    return cache / "llama-trt" / "tritonserver" / f"{install.version}-py{major}.{minor}" / "backends"


def prepare_backends(install: TritonInstall, dest: Path | None = None) -> Path:
    """A backend directory for this Python: ``dest/python/`` = the wheel's python backend + the
    stub for ``sys.version_info``. Written beside and renamed into place (never half-copied);
    an existing complete one is reused. Returns ``dest``."""
    dest = Path(dest) if dest is not None else default_backend_dir(install)
    stub = install.stub()
    target = dest / "python"
    lib = "libtriton_python.so"
    if (target / stub.name).is_file() and (target / lib).is_file():
        if filecmp.cmp(stub, target / stub.name, shallow=False) and \
                filecmp.cmp(install.python_backend / lib, target / lib, shallow=False):
            return dest
        shutil.rmtree(target)  # another Python's stub or another wheel's backend: replace it
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".python.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(install.python_backend, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / stub.name)
        os.chmod(tmp / stub.name, 0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: use its copy
            if not (target / stub.name).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class TritonLaunch:
    """One exact tritonserver command line: ``argv`` run with ``env`` added to the environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    ports: TritonPorts = TritonPorts()

    def command_line(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.ports.http}"


def launch_spec(repository, models: tuple[str, ...] | list[str], *, ports: TritonPorts = TritonPorts(),
                host: str = "127.0.0.1", install: TritonInstall | None = None, backend_dir: Path | None = None,
                extra_args: tuple[str, ...] = ()) -> TritonLaunch:
    """The command that serves ``models`` of ``repository`` (explicit model control, so only they load)."""
    install = install or find_tritonserver()
    check_stub_numpy(install)
    backend_dir = prepare_backends(install, backend_dir)
    ld = [str(python_lib_dir()), str(install.libs)]
    if os.environ.get("LD_LIBRARY_PATH"):
        ld.append(os.environ["LD_LIBRARY_PATH"])
    argv = [str(install.binary), f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={backend_dir.resolve()}", "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models),
            f"--http-address={host}", f"--http-port={ports.http}",
            f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
            f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
            "--allow-gpu-metrics=false", *extra_args]
    # the stub embeds Python in isolated mode (PYTHON* variables ignored) and finds its prefix
    # through the first python3 on PATH: this interpreter's folder first, so a venv is honoured
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = {"LD_LIBRARY_PATH": os.pathsep.join(ld), "PATH": path}
    return TritonLaunch(tuple(argv), env, host, ports)


def generic_command_line(repository, models, ports: TritonPorts = TritonPorts(), host: str = "127.0.0.1") -> str:
    """The command for a Triton install of its own (an NGC container: backends in /opt/tritonserver)."""
    argv = ["tritonserver", f"--model-repository={Path(repository).resolve()}", "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in models), f"--http-address={host}", f"--http-port={ports.http}",
            f"--grpc-address={host}", f"--grpc-port={ports.grpc}", f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}"]
    return shlex.join(argv)


def command_for_repository(repository, models, ports: TritonPorts = TritonPorts()) -> tuple[str, str | None]:
    """(exact command line, note): with the nvidia-pytriton wheel installed, the line that runs
    its binary (backend directory prepared); otherwise a plain ``tritonserver`` line + why."""
    try:
        return launch_spec(repository, models, ports=ports).command_line(), None
    except BackendUnavailableError as e:
        return generic_command_line(repository, models, ports), (
            f"note: {e}. The line above is for a Triton install of its own (NGC's tritonserver image), "
            "where llama-trt must be importable by the python backend.")


def serve_blocking(launch: TritonLaunch, ready_timeout: float = 300.0, on_ready=None) -> int:
    """Run tritonserver in the foreground (its log on our stdout) until it exits or we are
    interrupted (Ctrl-C, SIGTERM raised as SystemExit): then stop it by PID. Returns its exit code."""
    server = TritonServer(launch).start()
    try:
        server.wait_ready(ready_timeout)
        if on_ready is not None:
            on_ready(launch.http_url)
        code = server.proc.wait()
        if code != 0:
            raise TritonServerError(f"tritonserver exited with code {code}")
        return code
    finally:
        server.stop()


class TritonServer:
    """A running tritonserver process (context manager: ``start`` + ``wait_ready`` / ``stop``).
    ``log_file``: where its output goes (None: inherited, e.g. the terminal)."""

    def __init__(self, launch: TritonLaunch, log_file: Path | None = None, env: dict[str, str] | None = None):
        self.launch = launch
        self.log_file = Path(log_file) if log_file is not None else None
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> "TritonServer":
        env = dict(os.environ if self.env is None else self.env)
        env.update(self.launch.env)
        out = None
        if self.log_file is not None:
            self._log = open(self.log_file, "ab")
            out = self._log
        self.proc = subprocess.Popen(self.launch.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.launch.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> "TritonServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise TritonServerError(f"tritonserver exited (code {code}) before it was ready{self._log_hint()}")
            if self.ready():
                return self
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:]
        return f"; log {self.log_file}: " + " | ".join(tail)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the server's PID (it unloads the models and ends their stubs), then wait;
        SIGKILL to its whole process group if it is still there after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            else:
                _kill_group(proc.pid)  # the server died: do not leave its stubs behind
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return proc.returncode

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop(timeout=10)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_in_group(pgid: int) -> list[int]:
    """PIDs (Linux ``/proc``) whose process group is ``pgid``: what a stopped server left behind."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


__all__ = ["INSTALL_HINT", "TritonInstall", "TritonLaunch", "TritonPorts", "TritonServer", "TritonServerError",
           "check_stub_numpy", "command_for_repository", "default_backend_dir", "find_tritonserver",
           "generic_command_line", "launch_spec", "prepare_backends", "processes_in_group", "python_lib_dir",
           "serve_blocking"]
