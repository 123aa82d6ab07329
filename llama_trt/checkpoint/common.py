"""What every loader returns, and the strict name/shape check they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LlamaConfig
from ..errors import CheckpointError

# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",    # current save_pretrained writes the template here
    "chat_template.json",     # older processors' template file
    "generation_config.json",  # eos_token_id lists
)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: config + weights in Hugging Face naming."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    format: str                     # "hf" | "meta" | "llama2c" | "gguf"
    path: Path
    files: tuple[Path, ...]         # files the weights and config came from
    tokenizer_files: tuple[Path, ...] = field(default=())
    tokenizer_dir: Path | None = None  # the folder holding HF-style tokenizer files, if any

    def fingerprint(self) -> str:
        """sha256 over the checkpoint's files (names and bytes), for manifests."""
        return fingerprint_files(self.files)


def fingerprint_files(files) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of our model for ``config`` (no allocation)."""
    from ..model import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(
    state_dict: dict[str, torch.Tensor], config: LlamaConfig, source: Path
) -> dict[str, torch.Tensor]:
    """Strict check: every expected tensor present with its shape, nothing unknown.

    Returns the state dict with ignorable entries dropped and the tied lm head
    filled in. Raises :class:`CheckpointError` naming the file and the problem.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) (not a LLaMA layout?): {_few(unexpected)}")
    for name in sorted(set(expected) & set(sd)):
        got = tuple(sd[name].shape)
        if got != expected[name]:
            problems.append(f"shape mismatch for {name}: checkpoint has {list(got)}, config implies {list(expected[name])}")
    for name, t in sd.items():
        if name in expected and not t.is_floating_point():
            problems.append(f"tensor {name} has dtype {t.dtype}; expected a floating-point weight")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    return sd


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def find_tokenizer_files(folder: Path) -> tuple[Path, ...]:
    return tuple(folder / n for n in TOKENIZER_FILES if (folder / n).is_file())
