"""ONNX export folder -> engine folder (``model.plan`` + ``manifest.json`` + tokenizer + build.log).

Stages: **lower** (route the fused ops: plugin / native layer / function body), **parse**
(ONNX parser into a STRONGLY_TYPED network), **configure** (targets, the prefill and decode
profiles, timing cache), **build** (serialized engine streamed to disk), **write** (manifest,
tokenizer, log). The folder is built beside ENGINE_DIR and renamed into place at the end,
so a failed build leaves nothing behind. Backend differences live in :mod:`.backend`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..outputs import check_output, move_into_place, prepare_output
from . import backend as B
from .header import decode_engine_header
from .lowering import NATIVE, PLUGIN, LoweringOptions, OpRoute, activation_elem_type, detect_precision, lower_model
from .manifest import ENGINE_NAME, LOG_NAME, MANIFEST_NAME, EngineManifest
from .profiles import ShapeLimits, make_profiles

STAGES = ("lower", "parse", "configure", "build", "write")
DEFAULT_MAX_SEQ = 512
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
                   "generation_config.json")


@dataclass(frozen=True)
class BuildOptions:
    """What ``llama-trt build`` takes. ``None`` limits default from the model config:
    max_context = max_position_embeddings, max_seq = min(512, max_context)."""

    max_batch: int = 1
    max_seq: int | None = None
    max_context: int | None = None
    targets: tuple[str, ...] = ()            # AOT compute capabilities (TensorRT-RTX only)
    timing_cache: Path | None = None         # used on full TensorRT; a no-op on TensorRT-RTX 1.7
    force: bool = False                      # replace an existing ENGINE_DIR
    backend: str | None = None               # "tensorrt" | "tensorrt_rtx"; None: $LLAMA_TRT_BACKEND / detect
    plugins: bool | None = None              # None: use them when available; False: never; True: required
    rms_norm_native: bool = False            # RMSNorm -> ONNX RMSNormalization instead of the function body
    optimization_level: int | None = None    # builder_optimization_level (0..5)
    progress: bool = False                   # rich progress on stderr
    verbose: bool = False                    # echo TensorRT warnings on stderr

    def resolve_limits(self, config) -> ShapeLimits:
        ctx = self.max_context if self.max_context is not None else config.max_position_embeddings
        seq = self.max_seq if self.max_seq is not None else min(DEFAULT_MAX_SEQ, ctx)
        return ShapeLimits(self.max_batch, seq, ctx).validate(config.max_position_embeddings)


# ----------------------------------------------------------------------------- progress


class _Stages:
    """Times the stages, keeps a build log and (optionally) shows rich progress."""

    def __init__(self, show: bool):
        self.seconds: dict[str, float] = {}
        self.log: list[str] = []
        self._progress = None
        if show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=Console(stderr=True))

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def note(self, text: str) -> None:
        self.log.append(text)

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        task = self._progress.add_task(f"{name}: {what}", total=None) if self._progress else None
        detail: dict[str, str] = {}
        t0 = time.perf_counter()
        try:
            yield detail
        except BaseException:
            if task is not None:
                self._progress.update(task, description=f"[red]{name}: failed", total=1, completed=0)
            self.note(f"[{name}] failed after {time.perf_counter() - t0:.2f}s")
            raise
        dt = time.perf_counter() - t0
        self.seconds[name] = round(dt, 3)
        done = detail.get("done", what)
        self.note(f"[{name}] {done} ({dt:.2f}s)")
        if task is not None:
            self._progress.update(task, description=f"[green]{name}[/]: {done}", total=1, completed=1)


# ----------------------------------------------------------------------------- helpers


def _load_export(artifact_dir: Path):
    from ..exporter import load_manifest

    return load_manifest(artifact_dir)


def _external_locations(model) -> set[str]:
    from onnx import TensorProto

    locs = set()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    return locs


def _choose_plugins(backend: B.Backend, wanted: bool | None, stages: _Stages) -> bool:
    if wanted is False:
        stages.note("plugins: disabled by option")
        return False
    ok, why = B.register_llama_plugins(backend)
    if wanted and not ok:
        raise BuildError(f"--plugins requested but {why}; drop --plugins to lower the fused ops instead")
    stages.note("plugins: llama_trt plugins registered (AOT)" if ok else f"plugins: not used ({why})")
    return ok


def write_lowered(source_onnx: Path, work_dir: Path, options: LoweringOptions) -> tuple[Path, list[OpRoute], str]:
    """Lower ``source_onnx`` into ``work_dir/model.onnx`` (external data linked, not copied).

    Returns (path, routes, precision)."""
    import onnx

    model = onnx.load(str(source_onnx), load_external_data=False)
    precision = detect_precision(model)
    lowered, routes = lower_model(model, options)
    work_dir.mkdir(parents=True, exist_ok=True)
    for loc in _external_locations(lowered):
        src, dst = source_onnx.parent / loc, work_dir / loc
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(src.resolve(), dst)
        except OSError:
            shutil.copyfile(src, dst)
    out = work_dir / "model.onnx"
    onnx.save(lowered, str(out))
    return out, routes, precision


def _check_targets_vs_precision(targets, model_elem_type: int, precision: str) -> None:
    from onnx import TensorProto

    if "75" in targets and model_elem_type == TensorProto.FLOAT:
        raise BuildError(
            f"--target 75: TensorRT-RTX cannot compile fp32 matrix multiplies for Turing (SM75) and this "
            f"{precision} model has fp32 activations; export with --dtype fp16 or drop --target 75"
        )


def _route_layers(routes: list[OpRoute], counts: dict[str, int]) -> list[OpRoute]:
    """Attach the number of matching TensorRT layers where it is unambiguous."""
    plugin_ops = [r for r in routes if r.route == PLUGIN]
    out = []
    for r in routes:
        n = None
        if r.route == NATIVE and r.op.endswith(".RotaryEmbedding"):
            n = counts.get("ROTARY_EMBEDDING", 0)
        elif r.route == PLUGIN and len(plugin_ops) == 1:
            n = counts.get("PLUGIN_V3", 0)
        out.append(OpRoute(r.op, r.count, r.route, r.target, n))
    return out


def _tool_versions(backend: B.Backend) -> dict[str, str]:
    import numpy
    import onnx

    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("llama-trt")
    except PackageNotFoundError:
        ours = "unknown"
    return {"llama_trt": ours, "onnx": onnx.__version__, "numpy": numpy.__version__, backend.name: backend.version}


def _copy_tokenizer(export_dir: Path, names, out_dir: Path) -> list[str]:
    found = {n for n in names if (export_dir / n).is_file()}
    for pattern in TOKENIZER_GLOBS:
        found |= {p.name for p in export_dir.glob(pattern) if p.is_file()}
    for n in sorted(found):
        shutil.copy2(export_dir / n, out_dir / n)
    return sorted(found)


def _layer_counts(types: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- parse (shared)


@dataclass
class ParsedNetwork:
    """A parsed network and what keeps it alive (the parser owns the weights)."""

    backend: B.Backend
    builder: Any
    network: Any
    parser: Any
    logger: Any
    routes: list[OpRoute]
    precision: str
    layer_types: list[str] = field(default_factory=list)

    @property
    def layer_counts(self) -> dict[str, int]:
        return _layer_counts(self.layer_types)


def parse_network(backend: B.Backend, onnx_path: Path, routes, precision, stages: _Stages | None = None,
                  echo: str | None = None) -> ParsedNetwork:
    trt = backend.module()
    logger = B.make_logger(backend, echo)
    builder = trt.Builder(logger)
    network = B.create_network(backend, builder)
    ok, issues, parser = B.parse_onnx_file(backend, network, logger, onnx_path)
    if not ok:
        first = issues[0].describe() if issues else "; ".join(logger.errors()) or "unknown parser error"
        more = f" (+{len(issues) - 1} more parser errors)" if len(issues) > 1 else ""
        raise BuildError(f"{backend.display_name} cannot parse the ONNX model: {first}{more}")
    types = B.layer_types(network)
    return ParsedNetwork(backend, builder, network, parser, logger, list(routes), precision, types)


def inspect_network(artifact_dir, *, max_context: int | None = None, backend: str | None = None,
                    plugins: bool | None = False, rms_norm_native: bool = False) -> ParsedNetwork:
    """Lower and parse an export without building: what TensorRT makes of each op."""
    artifact_dir = Path(artifact_dir)
    export = _load_export(artifact_dir)
    cfg = export.llama_config
    be = B.detect_backend(backend)
    stages = _Stages(False)
    use_plugins = _choose_plugins(be, plugins, stages)
    with tempfile.TemporaryDirectory(prefix="llama_trt_inspect_") as tmp:
        path, routes, precision = write_lowered(
            export.model_path(artifact_dir), Path(tmp),
            LoweringOptions(max_context or cfg.max_position_embeddings, use_plugins, rms_norm_native))
        parsed = parse_network(be, path, routes, precision)
    parsed.routes = _route_layers(parsed.routes, parsed.layer_counts)
    return parsed


# ----------------------------------------------------------------------------- build


def build_engine(artifact_dir, engine_dir, options: BuildOptions | None = None) -> EngineManifest:
    """Build ``engine_dir`` from the export folder ``artifact_dir``; returns its manifest.

    Raises :class:`BuildError` (bad options, parse or build failure: the message names the
    option or the node) or :class:`BackendUnavailableError` (no TensorRT installed).
    """
    options = options or BuildOptions()
    artifact_dir, engine_dir = Path(artifact_dir), Path(engine_dir)
    export = _load_export(artifact_dir)
    config = export.llama_config
    limits = options.resolve_limits(config)
    check_output(engine_dir, force=options.force, inputs=(artifact_dir,), option="-o", error=BuildError)
    backend = B.detect_backend(options.backend)
    targets = B.validate_targets(backend, options.targets)
    if options.optimization_level is not None and not 0 <= options.optimization_level <= 5:
        raise BuildError(f"--opt-level must be in 0..5, got {options.optimization_level}")

    tmp = prepare_output(engine_dir, force=options.force, inputs=(artifact_dir,), option="-o", error=BuildError,
                         tag="building")
    t_start = time.perf_counter()
    try:
        with _Stages(options.progress) as stages:
            stages.note(f"llama-trt build {artifact_dir} -> {engine_dir} with {backend.display_name}")
            manifest = _build_into(tmp, artifact_dir, export, config, limits, targets, backend, options, stages,
                                   t_start)
            (tmp / LOG_NAME).write_text("\n".join(stages.log) + "\n")
        move_into_place(tmp, engine_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build_into(tmp: Path, artifact_dir: Path, export, config, limits: ShapeLimits, targets, backend: B.Backend,
                options: BuildOptions, stages: _Stages, t_start: float) -> EngineManifest:
    import onnx

    echo = "WARNING" if options.verbose else None
    work = tmp / "_lowered"
    source_onnx = export.model_path(artifact_dir)

    with stages.stage("lower", "routing fused ops") as d:
        use_plugins = _choose_plugins(backend, options.plugins, stages)
        lowering = LoweringOptions(limits.max_context, use_plugins, options.rms_norm_native)
        onnx_path, routes, precision = write_lowered(source_onnx, work, lowering)
        elem = activation_elem_type(onnx.load(str(onnx_path), load_external_data=False))
        if backend.is_rtx:
            _check_targets_vs_precision(targets, elem, precision)
        d["done"] = ", ".join(f"{r.op.split('.')[-1]} -> {r.route}" for r in routes) or "no fused ops"

    with stages.stage("parse", f"{backend.display_name} ONNX parser") as d:
        parsed = parse_network(backend, onnx_path, routes, precision, echo=echo)
        counts = parsed.layer_counts
        routes = _route_layers(routes, counts)
        for r in routes:
            layers = "" if r.trt_layers is None else f"; {r.trt_layers} TensorRT layers"
            stages.note(f"op {r.op} x{r.count} -> {r.route}: {r.target}{layers}")
            if r.trt_layers is not None and r.trt_layers != r.count:
                stages.note(f"warning: {r.op}: {r.count} nodes but {r.trt_layers} matching layers")
        io = B.network_io(parsed.network)
        d["done"] = f"{len(parsed.layer_types)} layers, precision {precision}"

    with stages.stage("configure", "targets, profiles, timing cache") as d:
        bconfig = parsed.builder.create_builder_config()
        set_targets = B.set_compute_targets(backend, bconfig, targets)
        if options.optimization_level is not None:
            bconfig.builder_optimization_level = int(options.optimization_level)
        profiles = make_profiles(limits)
        names = [t["name"] for t in io["inputs"]]
        shapes = [p.input_shapes(names, config.num_kv_heads, config.head_dim) for p in profiles]
        indices = B.add_profiles(backend, parsed.builder, bconfig, shapes)
        if indices != [p.index for p in profiles]:
            raise BuildError(f"{backend.display_name} numbered the profiles {indices}, expected 0 and 1")
        cache, cache_note = B.attach_timing_cache(backend, bconfig, options.timing_cache)
        stages.note(cache_note)
        for p in profiles:
            stages.note(f"profile {p.index} {p.name}: (batch, seq, past) min {p.min} opt {p.opt} max {p.max}")
        d["done"] = (f"targets {', '.join('sm_' + t for t in set_targets) or 'backend default'}; "
                     f"profiles prefill+decode (B={limits.max_batch}, S={limits.max_seq}, C={limits.max_context})")

    with stages.stage("build", "building the engine") as d:
        plan = tmp / ENGINE_NAME
        nbytes = B.build_to_file(backend, parsed.builder, parsed.network, bconfig, plan)
        if not nbytes:
            errors = parsed.logger.errors()
            detail = "; ".join(errors[-3:]) if errors else "no error message from TensorRT"
            raise BuildError(f"{backend.display_name} failed to build the engine: {detail}")
        saved_cache = B.save_timing_cache(backend, bconfig, options.timing_cache)
        d["done"] = f"{nbytes / 1e6:.2f} MB"

    with stages.stage("write", "manifest, tokenizer, log") as d:
        shutil.rmtree(work, ignore_errors=True)
        header = decode_engine_header(plan)
        recorded_targets = tuple(set_targets) or tuple(header["compute_capabilities"] if header else ())
        if not backend.is_rtx and not recorded_targets:
            from .compat import gpu_compute_capability

            gpu = gpu_compute_capability()
            recorded_targets = (gpu.compute_capability,) if gpu else ()
        tokenizer = _copy_tokenizer(artifact_dir, export.tokenizer_files, tmp)
        for level, msg in parsed.logger.messages:
            if level in ("WARNING", "ERROR", "INTERNAL_ERROR"):
                stages.note(f"[{backend.name} {level}] {msg}")
        manifest = EngineManifest(
            backend=backend.name,
            backend_version=backend.version,
            targets=recorded_targets,
            precision=precision,
            limits={"max_batch": limits.max_batch, "max_seq": limits.max_seq, "max_context": limits.max_context},
            profiles=tuple(profiles),
            op_routing=tuple(routes),
            config=config.to_dict(),
            source={"path": str(artifact_dir.resolve()), "manifest": export.to_dict()},
            io=io,
            engine_bytes=int(nbytes),
            build_seconds=round(time.perf_counter() - t_start, 3),
            stage_seconds=dict(stages.seconds),
            timing_cache={"path": str(options.timing_cache) if options.timing_cache else None,
                          "used": cache is not None, "saved": saved_cache, "note": cache_note},
            header=header,
            layer_counts=counts,
            tokenizer_files=tuple(tokenizer),
            tool_versions=_tool_versions(backend),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        d["done"] = f"{ENGINE_NAME}, {MANIFEST_NAME}, {len(tokenizer)} tokenizer files"
    return manifest


__all__ = ["BuildOptions", "ParsedNetwork", "STAGES", "build_engine", "inspect_network", "write_lowered"]
