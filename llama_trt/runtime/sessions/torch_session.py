"""The torch reference session (eager ``LlamaForCausalLM``); the only runtime module that imports torch.

On ``device="cuda"`` the model's RMSNorm and RoPE custom ops run the Triton kernels
(registered for CUDA in :mod:`llama_trt.plugins`); inputs and logits still cross as numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import build_model, load_checkpoint
from ..artifact import Artifact
from .base import Session, physical_cores


class TorchSession(Session):
    backend = "torch"

    @classmethod
    def from_artifact(cls, artifact: Artifact, *, dtype: str | None = None, threads: int | None = None,
                      device: str = "cpu", **_ignored) -> "TorchSession":
        path = artifact.path if artifact.kind == "checkpoint" else artifact.source_checkpoint
        ckpt = load_checkpoint(path)
        if dtype is None:  # follow an export's precision when opened from one
            dtype = str(artifact.manifest.get("dtype") or artifact.manifest.get("precision") or "fp32")
            dtype = dtype if dtype in ("fp32", "fp16", "bf16") else "fp32"
        model = build_model(ckpt, dtype)
        return cls(model, path, dtype=dtype, threads=threads, device=device)

    def __init__(self, model, source: Path | str = "", *, dtype: str = "fp32", threads: int | None = None,
                 device: str = "cpu") -> None:
        config = model.config
        super().__init__(config, config.max_position_embeddings)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.source = str(source)
        self.dtype = dtype
        self.threads = int(threads or physical_cores())
        torch.set_num_threads(self.threads)
        self._cache = None

    def _reset(self, batch: int, capacity: int) -> None:
        self._cache = self.model.empty_cache(batch)

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, position_ids, *, last_only: bool = False) -> np.ndarray:
        dev = self.device
        logits, self._cache = self.model(
            torch.from_numpy(input_ids).to(dev), torch.from_numpy(attention_mask).to(dev),
            torch.from_numpy(position_ids).to(dev), self._cache,
        )
        return (logits[:, -1:] if last_only else logits).cpu().numpy()

    def kv_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(k.float().cpu().numpy().copy(), v.float().cpu().numpy().copy()) for k, v in self._cache]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.source, "dtype": self.dtype, "device": str(self.device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(), "mode": "eager, inference_mode, KV cache by concatenation"}

    def close(self) -> None:
        self.model = None
        self._cache = None
