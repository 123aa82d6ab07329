"""Hugging Face model ids (``org/name``) resolved from the local Hugging Face cache, offline.

We never download: ``snapshot_download(local_files_only=True)`` finds the cached snapshot (it
honours ``HF_HOME`` / ``HF_HUB_CACHE``); when it is not cached, the error says how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def resolve_checkpoint(path) -> Path:
    """``path`` itself when it exists; a cached Hugging Face id -> its snapshot folder (or .gguf)."""
    path = Path(path)
    if path.exists() or not looks_like_repo_id(str(path)):
        return path
    repo_id = str(path)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"checkpoint not found: {repo_id} is not a local path, and reading the "
                              'Hugging Face cache needs huggingface_hub (pip install -e ".[real]")') from None
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache_dir()))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {repo_id} is not a local path nor in the local Hugging Face cache; "
            f"download it first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`)") from None
    return _pick_in_snapshot(folder, repo_id)


def hub_cache_dir() -> str | None:
    """The Hugging Face cache as the environment says *now* (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def _pick_in_snapshot(folder: Path, repo_id: str) -> Path:
    if (folder / "config.json").is_file() or (folder / "params.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(g.name for g in ggufs[:6])
        raise CheckpointError(f"{repo_id}: the cached snapshot holds several GGUF files ({names}); "
                              f"pass one of them: {folder}/<file>.gguf")
    raise CheckpointError(f"{repo_id}: the cached snapshot {folder} has no config.json nor .gguf file; "
                          f"download the full model with `hf download {repo_id}`")
