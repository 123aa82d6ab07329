"""Output folders and manifest file names, written and read safely. Every command that writes a
folder (export, build, create-tiny, demo, package) goes through here.

* :func:`prepare_output` refuses an ``-o`` that is a file, the input, an ancestor of the input
  or of the working directory, and replaces an existing folder only with ``--force`` and only
  when its ``manifest.json`` says llama-trt wrote it. It returns a temporary folder beside the
  output; :func:`move_into_place` renames it over the output at the end (nothing half-written).
* :func:`check_file_names` makes sure the file names a manifest lists (``model_file``,
  ``tokenizer_files``...) are plain names inside their folder, before anything opens or copies them.

Must not import click, torch or anything heavy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import LlamaTrtError
from .termination import raise_if_terminated

MANIFEST = "manifest.json"
CHECKPOINT_KIND = "llama_trt.checkpoint"
DEMO_KIND = "llama_trt.demo"
# manifest kinds llama-trt writes: only such folders may be replaced by --force
OUR_KINDS = ("llama_trt.onnx_export", "engine", CHECKPOINT_KIND, DEMO_KIND)


def manifest_kind(folder: Path) -> str | None:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def is_our_artifact(folder: Path) -> bool:
    return manifest_kind(folder) in OUR_KINDS


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(out: Path, *, force: bool, inputs: Iterable[Path] = (), option: str = "-o",
                 error: type[LlamaTrtError] = LlamaTrtError) -> None:
    """Raise ``error`` (one line naming the fix) unless ``out`` may be written (see module doc)."""
    out = Path(out)
    real = out.resolve()
    for inp in inputs:
        if _contains(real, Path(inp).resolve()):
            raise error(f"{option} {out} is the input {inp} or contains it: writing there would delete it; "
                        f"choose another {option}")
    cwd = Path.cwd().resolve()
    if _contains(real, cwd):
        raise error(f"{option} {out} is the working directory or contains it; choose another {option}")
    if out.is_symlink():
        raise error(f"{option} {out} is a symbolic link; choose a real folder for {option}")
    if not out.exists():
        return
    if not out.is_dir():
        raise error(f"{option} {out} is a file, not a folder; choose a folder name for {option}")
    if not any(out.iterdir()):
        return
    if not force:
        raise error(f"{option} {out} already exists; pass --force to replace it")
    if not is_our_artifact(out):
        raise error(f"{option} {out} exists and is not a llama-trt output (no manifest.json of ours): --force only "
                    f"replaces earlier llama-trt outputs; remove it yourself or choose another {option}")


def prepare_output(out: Path, *, force: bool, inputs: Iterable[Path] = (), option: str = "-o",
                   error: type[LlamaTrtError] = LlamaTrtError, tag: str = "tmp") -> Path:
    """:func:`check_output`, then a fresh temporary folder ``.NAME.TAG-XXXX`` beside ``out``."""
    out = Path(out).absolute()
    check_output(out, force=force, inputs=inputs, option=option, error=error)
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise error(f"cannot create {out}: {p} is a file, not a folder; choose another {option}")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=parent))
    except OSError as e:
        raise error(f"cannot write into {parent}: {e.strerror or e}; choose a writable {option}") from None


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` over ``out`` (the old ``out`` is removed only once the new one is there)."""
    raise_if_terminated()  # a SIGTERM whose exception Python swallowed must not publish the folder
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        Path(tmp).rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_file_names(names, where: Path, key: str, error: type[LlamaTrtError] = LlamaTrtError) -> tuple[str, ...]:
    """``names`` (a manifest's list, or one name) if each is a plain file name: no folder part,
    not absolute, not ``.``/``..``; otherwise ``error`` naming the manifest key."""
    items = [names] if isinstance(names, str) else list(names or ())
    for name in items:
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
                or "/" in name or "\\" in name or "\x00" in name:
            raise error(f"{where}/{MANIFEST}: {key} lists {name!r}, which is not a file name inside the folder; "
                        "the manifest is corrupt or was edited: re-create the artifact")
    return tuple(items)


__all__ = ["CHECKPOINT_KIND", "DEMO_KIND", "OUR_KINDS", "check_file_names", "check_output", "is_our_artifact",
           "manifest_kind", "move_into_place", "prepare_output"]
