"""``llama-trt info``: what a checkpoint is, how big it is per precision."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LlamaConfig, Precision, bytes_per_param
from .loader import load_checkpoint


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str
    config: LlamaConfig
    parameters: int
    bytes_per_precision: dict[str, int]
    tokenizer_files: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "config": self.config.to_dict(),
            "parameters": self.parameters,
            "bytes": self.bytes_per_precision,
            "tokenizer_files": list(self.tokenizer_files),
        }


def checkpoint_info(path) -> CheckpointInfo:
    ckpt = load_checkpoint(path)
    n = ckpt.config.num_parameters()
    return CheckpointInfo(
        path=str(ckpt.path),
        format=ckpt.format,
        config=ckpt.config,
        parameters=n,
        bytes_per_precision={p.value: int(n * bytes_per_param(p)) for p in Precision},
        tokenizer_files=tuple(f.name for f in ckpt.tokenizer_files),
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render_info(info: CheckpointInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info.path} ({info.format})", show_header=True)
    table.add_column("field")
    table.add_column("value")
    for k, v in info.config.to_dict().items():
        table.add_row(k, str(v))
    table.add_row("parameters", f"{info.parameters:,}")
    for p, b in info.bytes_per_precision.items():
        table.add_row(f"weights {p}", _human(b))
    table.add_row("tokenizer files", ", ".join(info.tokenizer_files) or "none")
    Console().print(table)
