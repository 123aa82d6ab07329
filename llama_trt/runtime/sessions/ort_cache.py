"""The graph an ONNX Runtime session loads: made once per export, then read from a cache.

Opening an export used to load the whole model with ``onnx``, copy it through the fused-ops
rewrite, serialize it again and hand those bytes to ONNX Runtime: four copies of the weights
at peak (5.0 GB for SmolLM2's 0.54 GB in fp32) and 6-16 s per open. Now:

* the graph is read without its weights (:func:`.onnx_skeleton.load_skeleton`): every big
  initializer is an external-data reference to the bytes already in the export's file(s);
* the rewrite (:func:`.ort_lowering.lower_for_ort`) runs on that skeleton (a few MB) and the
  result is written to ``<cache>/ort-graphs/<key>.onnx`` with its report beside it;
* later opens read that small file; ONNX Runtime reads the weights straight from the export
  folder (``session.model_external_initializers_file_folder_path``), so they exist once.

The key hashes what the rewritten graph depends on: the export's manifest and model file
identity (name, size, mtime, inode: a re-export changes it), the rewrite's context, whether
the rewrite is on, and the source of the rewrite modules (a new llama-trt version changes it).
The model file is not hashed byte by byte: that alone would take a second for SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...quantize.schemes import OrtKernelForm

#: initializers up to this many bytes are read into the graph (the rewrite reads inv_freq, shapes...)
INLINE_MAX_BYTES = 1 << 18
CACHE_SUBDIR = "ort-graphs"
#: entries kept in the cache (least recently written go first); each is the graph only (~1 MB)
CACHE_ENTRIES = 64


def default_cache_dir() -> Path:
    """``$LLAMA_TRT_CACHE/ort-graphs`` (default ``~/.cache/llama-trt``), as the checkpoint zoo's cache."""
    env = os.environ.get("LLAMA_TRT_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "llama-trt") / CACHE_SUBDIR


@dataclass(frozen=True)
class SessionGraph:
    """The serialized graph to give ONNX Runtime, with its weights left in ``weights_dir``.

    A cached graph is handed to ONNX Runtime by path (:meth:`source`), so this process holds no
    copy of it (a quantized graph carries its packed projections inline: tens of MB)."""

    data: bytes | None           # the serialized graph; None when it lies in ``cache_file``
    weights_dir: Path
    fused: bool
    report: dict[str, Any] | str
    cache_file: Path | None      # where it was read from or written to; None if not cached
    from_cache: bool

    @property
    def model_bytes(self) -> bytes:
        return self.data if self.data is not None else self.cache_file.read_bytes()

    def source(self) -> "str | bytes":
        """What ``onnxruntime.InferenceSession`` takes: the cache file's path, else the bytes."""
        return str(self.cache_file) if self.data is None else self.data


def _source_digest() -> str:
    from ...quantize import qdq, schemes, weights
    from ...trt_engines import lowering as trt_lowering
    from . import onnx_skeleton, ort_attention, ort_gqa, ort_graph, ort_head, ort_lowering, ort_pack

    h = hashlib.sha256()
    for mod in (onnx_skeleton, ort_attention, ort_gqa, ort_graph, ort_head, ort_lowering, ort_pack, qdq, schemes,
                weights, trt_lowering):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def cache_key(onnx_path: Path, rope_context: int, fused: bool, form: OrtKernelForm = OrtKernelForm()) -> str:
    onnx_path = Path(onnx_path).resolve()
    h = hashlib.sha256()
    manifest = onnx_path.parent / "manifest.json"
    h.update(manifest.read_bytes() if manifest.is_file() else b"")
    for p in sorted(onnx_path.parent.iterdir()):  # model.onnx, its data file(s), the rest of the folder
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino};".encode())
    h.update(f"{onnx_path};ctx={rope_context};fused={fused};inline={INLINE_MAX_BYTES};".encode())
    h.update(form.key().encode())
    h.update(_source_digest().encode())
    return h.hexdigest()[:32]


def _build(onnx_path: Path, rope_context: int, fused: bool,
           form: OrtKernelForm) -> tuple[list[bytes], bool, dict[str, Any] | str]:
    """The session graph's encoding (in parts: :func:`.onnx_skeleton.serialize_in_parts`), whether
    it was rewritten, and the rewrite's report or why not."""
    from .onnx_skeleton import load_skeleton, serialize_in_parts
    from .ort_lowering import can_lower, lower_for_ort

    model = load_skeleton(onnx_path, INLINE_MAX_BYTES)
    if not fused:
        return [model.SerializeToString()], False, "off (fused_ops=False)"
    why = can_lower(model)
    if why is not None:
        return [model.SerializeToString()], False, f"off: {why}"
    try:
        lowered, report = lower_for_ort(model, rope_context, weights_dir=Path(onnx_path).resolve().parent,
                                        form=form)
    except Exception as e:  # noqa: BLE001 - an unexpected graph: run it as exported
        return [model.SerializeToString()], False, f"off: rewrite failed ({type(e).__name__}: {str(e).splitlines()[0]})"
    del model
    del lowered.graph.value_info[:]  # shapes recorded for the replaced nodes no longer hold
    return serialize_in_parts(lowered), True, report.to_dict()


def _write_atomic(path: Path, data: "bytes | list[bytes]") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines([data] if isinstance(data, bytes) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prune(cache_dir: Path, keep: int = CACHE_ENTRIES) -> None:
    graphs = sorted(cache_dir.glob("*.onnx"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in graphs[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


def session_graph(onnx_path, rope_context: int, *, fused: bool, cache_dir: Path | None = None,
                  use_cache: bool = True, form: OrtKernelForm = OrtKernelForm()) -> SessionGraph:
    """The graph for a session over ``onnx_path``: from the cache, or built (and cached).
    ``form``: how the quantized weights are handed to ONNX Runtime's kernels (the export's
    certified form; see :class:`~llama_trt.quantize.schemes.OrtKernelForm`)."""
    onnx_path = Path(onnx_path)
    weights_dir = onnx_path.resolve().parent
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(onnx_path, rope_context, fused, form) if use_cache else ""
    graph_file, report_file = cache_dir / f"{key}.onnx", cache_dir / f"{key}.json"
    if use_cache and graph_file.is_file() and report_file.is_file():
        try:
            meta = json.loads(report_file.read_text())
            if graph_file.stat().st_size:
                return SessionGraph(None, weights_dir, bool(meta["fused"]), meta["report"], graph_file, True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: rebuild it
    parts, did_fuse, report = _build(onnx_path, rope_context, fused, form)
    if not use_cache:
        return SessionGraph(b"".join(parts), weights_dir, did_fuse, report, None, False)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(graph_file, parts)
        _write_atomic(report_file, json.dumps({"fused": did_fuse, "report": report,
                                               "export": str(onnx_path.resolve())}).encode())
        _prune(cache_dir)
    except OSError:  # a read-only cache: run uncached
        return SessionGraph(b"".join(parts), weights_dir, did_fuse, report, None, False)
    return SessionGraph(None, weights_dir, did_fuse, report, graph_file, False)


__all__ = ["CACHE_SUBDIR", "INLINE_MAX_BYTES", "SessionGraph", "cache_key", "default_cache_dir", "session_graph"]
