"""The one adapter over full TensorRT (``tensorrt`` 10.x / 11.x) and TensorRT-RTX.

Everything above this module is backend-agnostic: it asks :func:`detect_backend`
for a :class:`Backend` and calls the small functions below for what differs.

What differs (and nothing else):

* **module**: ``tensorrt`` vs ``tensorrt_rtx_bindings`` (PyPI ``tensorrt-rtx-cu13-bindings``;
  some installs expose it as ``tensorrt_rtx``). The RTX module is also registered as
  ``sys.modules["tensorrt_rtx"]`` so Polygraphy (``POLYGRAPHY_USE_TENSORRT_RTX=1``) finds it.
* **targets**: only TensorRT-RTX builds ahead-of-time for chosen compute capabilities
  (``config.num_compute_capabilities`` + ``set_compute_capability``), and it does so on a
  machine without a GPU. Full TensorRT builds for the GPU it runs on.
* **plugins**: only full TensorRT has custom plugins (``tensorrt.plugin``).
* **timing cache**: used on full TensorRT; a no-op on TensorRT-RTX 1.7 (it warns
  "Timing cache operations are no-ops in TensorRT-RTX"), so it is not attached there.

Precision never differs: networks are created STRONGLY_TYPED on both (TensorRT 10.x needs
the flag explicitly; 11.x and RTX are always strongly typed). No BuilderFlag.FP16/INT8 and
no calibrators are used anywhere: fp16 comes from an fp16 ONNX, int8 from Q/DQ nodes.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, BuildError

ENV_VAR = "LLAMA_TRT_BACKEND"
TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt_rtx"
BACKEND_NAMES = (TENSORRT, TENSORRT_RTX)
#: Detection order when LLAMA_TRT_BACKEND is not set: full TensorRT first (it runs on every
#: NVIDIA GPU, sm_90 included, and has plugins), then TensorRT-RTX.
DETECTION_ORDER = (TENSORRT, TENSORRT_RTX)
_MODULE_CANDIDATES = {
    TENSORRT: ("tensorrt",),
    TENSORRT_RTX: ("tensorrt_rtx_bindings", "tensorrt_rtx"),
}
_ALIASES = {"trt": TENSORRT, "tensorrt": TENSORRT, "rtx": TENSORRT_RTX, "tensorrt_rtx": TENSORRT_RTX,
            "tensorrt-rtx": TENSORRT_RTX}
INSTALL_HINT = (
    "install TensorRT-RTX (`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`, or "
    "`pip install llama-trt[rtx]`; builds engines even without a GPU) or full TensorRT "
    "(JetPack, or `pip install tensorrt` from NVIDIA's index)"
)
TIMING_CACHE_RTX_NOTE = "timing cache not used: timing cache operations are no-ops in TensorRT-RTX 1.7"


@dataclass(frozen=True)
class Backend:
    """An importable TensorRT flavour and what it can do."""

    name: str                          # "tensorrt" | "tensorrt_rtx"
    module_name: str                   # the module to import
    version: str
    can_build_without_gpu: bool
    supports_custom_plugins: bool      # tensorrt.plugin is importable
    aot_targets: tuple[str, ...] = ()  # compute capabilities selectable at build time ("89", "120")
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def display_name(self) -> str:
        return f"{'TensorRT-RTX' if self.name == TENSORRT_RTX else 'TensorRT'} {self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.name == TENSORRT_RTX

    def module(self):
        """The imported TensorRT module (cached by Python)."""
        return importlib.import_module(self.module_name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "module": self.module_name,
                "can_build_without_gpu": self.can_build_without_gpu,
                "supports_custom_plugins": self.supports_custom_plugins,
                "aot_targets": list(self.aot_targets)}


# ----------------------------------------------------------------------------- detection


def normalize_backend_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise BackendUnavailableError(
            f"unknown TensorRT backend {name!r} (from {ENV_VAR} or --backend); choose tensorrt or tensorrt_rtx"
        )
    return _ALIASES[key]


def _import_flavour(name: str):
    """(module_name, module) or (None, reason)."""
    reasons = []
    for mod_name in _MODULE_CANDIDATES[name]:
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - ImportError, or a stub / missing shared library
            reasons.append(f"{mod_name}: {type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "Builder"):  # e.g. the PyPI `tensorrt` placeholder
            reasons.append(f"{mod_name}: not a TensorRT build (no Builder)")
            continue
        if name == TENSORRT_RTX:
            sys.modules.setdefault("tensorrt_rtx", mod)  # for Polygraphy's RTX mode
        return mod_name, mod
    return None, "; ".join(reasons)


def _describe(name: str, mod_name: str, mod) -> Backend:
    version = str(getattr(mod, "__version__", "unknown"))
    if name == TENSORRT_RTX:
        cc_enum = getattr(mod, "ComputeCapability", None)
        members = getattr(cc_enum, "__members__", {}) if cc_enum is not None else {}
        targets = tuple(sorted((m[2:] for m in members if m.startswith("SM")), key=int))
        return Backend(TENSORRT_RTX, mod_name, version, can_build_without_gpu=True,
                       supports_custom_plugins=False, aot_targets=targets,
                       notes=("no sm_90 (Hopper) support", "no custom plugins"))
    try:
        importlib.import_module(f"{mod_name}.plugin")
        plugins = True
    except Exception:  # noqa: BLE001
        plugins = False
    return Backend(TENSORRT, mod_name, version, can_build_without_gpu=False, supports_custom_plugins=plugins)


def available_backends() -> list[Backend]:
    """Every importable flavour, in detection order (no error when none is)."""
    out = []
    for name in DETECTION_ORDER:
        mod_name, mod = _import_flavour(name)
        if mod_name is not None:
            out.append(_describe(name, mod_name, mod))
    return out


def detect_backend(prefer: str | None = None) -> Backend:
    """The backend to use: ``prefer``, else $LLAMA_TRT_BACKEND, else the first importable.

    Raises :class:`BackendUnavailableError` naming what to install.
    """
    wanted = prefer or os.environ.get(ENV_VAR) or None
    if wanted:
        name = normalize_backend_name(wanted)
        mod_name, mod = _import_flavour(name)
        if mod_name is None:
            src = f"{ENV_VAR}={wanted}" if not prefer else f"backend {wanted!r}"
            raise BackendUnavailableError(f"{src} asks for {name} but it cannot be imported ({mod}); {INSTALL_HINT}")
        return _describe(name, mod_name, mod)
    reasons = []
    for name in DETECTION_ORDER:
        mod_name, mod = _import_flavour(name)
        if mod_name is not None:
            return _describe(name, mod_name, mod)
        reasons.append(mod)
    raise BackendUnavailableError(f"neither TensorRT nor TensorRT-RTX is importable; {INSTALL_HINT}")


# ----------------------------------------------------------------------------- logging


def make_logger(backend: Backend, echo_severity: str | None = None, echo=None):
    """A ``trt.ILogger`` that keeps every message (``.messages`` = [(severity, text)]).

    ``trt.Logger`` prints to stdout; this one echoes only messages at ``echo_severity``
    or worse (e.g. "WARNING") through ``echo`` (default: stderr), and nothing by default.
    """
    trt = backend.module()
    Sev = trt.ILogger.Severity
    threshold = int(getattr(Sev, echo_severity)) if echo_severity else -1
    sink = echo or (lambda text: print(text, file=sys.stderr))
    prefix = "TRT-RTX" if backend.is_rtx else "TRT"

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity.name, msg))
            if int(severity) <= threshold:  # lower value = more severe
                sink(f"[{prefix}] [{severity.name}] {msg}")

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

    return _Logger()


# ----------------------------------------------------------------------------- build-time differences


def create_network(backend: Backend, builder):
    """A STRONGLY_TYPED network definition (explicit flag: TensorRT 10.x needs it)."""
    trt = backend.module()
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def normalize_target(value) -> str:
    """'89', '8.9', 'sm89', 'sm_89', 'SM89', (8, 9) -> '89'."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}{int(value[1])}"
    text = str(value).strip().lower().replace("sm_", "").replace("sm", "").replace("compute_", "")
    if "." in text:
        major, _, minor = text.partition(".")
        text = f"{major}{minor}"
    if not text.isdigit() or len(text) < 2:
        raise BuildError(f"--target {value!r} is not a compute capability (examples: 89, 8.9, sm_120)")
    return str(int(text))


def validate_targets(backend: Backend, targets) -> tuple[str, ...]:
    """Normalised, de-duplicated targets; :class:`BuildError` naming --target when unusable."""
    targets = tuple(dict.fromkeys(normalize_target(t) for t in targets or ()))
    if not targets:
        return ()
    if not backend.is_rtx:
        raise BuildError(
            f"--target is only supported by TensorRT-RTX (ahead-of-time builds); {backend.display_name} "
            "builds for the GPU it runs on: drop --target or set LLAMA_TRT_BACKEND=tensorrt_rtx"
        )
    bad = [t for t in targets if t not in backend.aot_targets]
    if bad:
        hint = " (sm_90 / Hopper is not supported by TensorRT-RTX: use full TensorRT)" if "90" in bad else ""
        raise BuildError(
            f"--target {', '.join(bad)}: not a {backend.display_name} target{hint}; "
            f"choose from {', '.join(backend.aot_targets)}"
        )
    return targets


def set_compute_targets(backend: Backend, config, targets) -> tuple[str, ...]:
    """Select the ahead-of-time targets; returns them normalised. Empty = backend default.

    TensorRT-RTX: each target must be one of ``backend.aot_targets``. Full TensorRT
    builds for the GPU it runs on and takes no targets.
    """
    targets = validate_targets(backend, targets)
    if not targets:
        return ()
    trt = backend.module()
    config.num_compute_capabilities = len(targets)  # a property; must be set before the targets
    for i, t in enumerate(targets):
        if not config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{t}"), i):
            raise BuildError(f"--target {t}: {backend.display_name} refused compute capability SM{t}")
    return targets


def attach_timing_cache(backend: Backend, config, path: Path | None) -> tuple[Any, str]:
    """(cache or None, note). Full TensorRT: load ``path`` if it exists, else start empty."""
    if path is None:
        return None, "no timing cache requested"
    if backend.is_rtx:
        return None, TIMING_CACHE_RTX_NOTE
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"--timing-cache {path}: TensorRT refused it (made by another TensorRT or GPU?); delete it")
    return cache, f"timing cache {'loaded from' if data else 'created at'} {path}"


def save_timing_cache(backend: Backend, config, path: Path | None) -> bool:
    if path is None or backend.is_rtx:
        return False
    cache = config.get_timing_cache()
    if cache is None:
        return False
    data = cache.serialize()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def build_to_file(backend: Backend, builder, network, config, path: Path) -> int | None:
    """Build and write the serialized engine to ``path``; bytes written, or None on failure.

    Streams with ``build_serialized_network_to_stream`` where available (lower peak RAM).
    """
    trt = backend.module()
    path = Path(path)
    if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
        class _FileWriter(trt.IStreamWriter):
            def __init__(self, f):
                trt.IStreamWriter.__init__(self)
                self.f, self.nbytes = f, 0

            def write(self, data):
                mv = memoryview(data)
                self.f.write(mv)
                self.nbytes += mv.nbytes
                return mv.nbytes

        with open(path, "wb") as f:
            writer = _FileWriter(f)
            ok = builder.build_serialized_network_to_stream(network, config, writer)
        return writer.nbytes if ok and writer.nbytes else None
    ser = builder.build_serialized_network(network, config)
    if ser is None:
        return None
    with open(path, "wb") as f:
        f.write(ser)  # IHostMemory has the buffer protocol (len() fails; use .nbytes)
    return int(ser.nbytes)


def register_llama_plugins(backend: Backend) -> tuple[bool, str]:
    """Register the llama_trt plugins (AOT) on full TensorRT; (ok, why not)."""
    if backend.is_rtx:
        return False, "TensorRT-RTX has no custom plugins"
    if not backend.supports_custom_plugins:
        return False, f"{backend.display_name} has no `tensorrt.plugin` module"
    try:
        from ..plugins.rms_norm.trt_plugin import register_plugins as reg_rms
        from ..plugins.rope.trt_plugin import register_plugins as reg_rope

        reg_rms("aot")
        reg_rope("aot")
    except Exception as e:  # noqa: BLE001 - BackendUnavailableError, triton missing, ...
        return False, f"llama_trt plugins could not be registered ({type(e).__name__}: {e})"
    return True, ""


# ----------------------------------------------------------------------------- parsing / inspection


@dataclass(frozen=True)
class ParseIssue:
    code: str
    desc: str
    node: int
    node_name: str
    node_operator: str
    local_function_stack: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"node {self.node_name!r} ({self.node_operator})" if self.node >= 0 else "graph"
        stack = f" inside function {' > '.join(self.local_function_stack)}" if self.local_function_stack else ""
        return f"{where}{stack}: {self.desc} [{self.code}]"


def parse_onnx_file(backend: Backend, network, logger, path: Path) -> tuple[bool, list[ParseIssue], Any]:
    """Parse ``path`` (external data resolved beside it); (ok, issues, parser)."""
    trt = backend.module()
    parser = trt.OnnxParser(network, logger)
    ok = bool(parser.parse_from_file(os.path.abspath(path)))
    issues = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        stack: tuple[str, ...] = ()
        try:
            if e.local_function_stack_size():
                stack = tuple(e.local_function_stack())
        except AttributeError:  # older parsers
            pass
        issues.append(ParseIssue(str(e.code()).split(".")[-1], str(e.desc()), int(e.node()),
                                 str(getattr(e, "node_name", lambda: "")()),
                                 str(getattr(e, "node_operator", lambda: "")()), stack))
    return ok and not issues, issues, parser


def layer_types(network) -> list[str]:
    """LayerType names of the parsed network, in order (e.g. "ROTARY_EMBEDDING", "PLUGIN_V3")."""
    return [network.get_layer(i).type.name for i in range(network.num_layers)]


def network_io(network) -> dict[str, list[dict[str, Any]]]:
    def desc(t):
        return {"name": t.name, "dtype": t.dtype.name.lower(), "shape": [int(d) for d in t.shape]}

    return {"inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)]}


def add_profiles(backend: Backend, builder, config, profile_shapes) -> list[int]:
    """``profile_shapes``: one {input: (min, opt, max)} per profile; returns the indices."""
    out = []
    for shapes in profile_shapes:
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            prof.set_shape(name, tuple(mn), tuple(opt), tuple(mx))
        out.append(int(config.add_optimization_profile(prof)))
    return out


__all__ = [
    "BACKEND_NAMES", "Backend", "ENV_VAR", "INSTALL_HINT", "ParseIssue", "TENSORRT", "TENSORRT_RTX",
    "add_profiles", "attach_timing_cache", "available_backends", "build_to_file", "create_network",
    "detect_backend", "layer_types", "make_logger", "network_io", "normalize_backend_name", "normalize_target",
    "parse_onnx_file", "register_llama_plugins", "save_timing_cache", "set_compute_targets", "validate_targets",
]
