"""Checkpoint loaders (stage 1): HF folders, Meta folders, llama2.c .bin -> (LlamaConfig, weights)."""

from .common import Checkpoint, check_state_dict, expected_shapes, fingerprint_files
from .loader import build_model, detect_format, load_checkpoint, load_model, torch_dtype
from .writer import create_tiny_checkpoint, random_state_dict, save_hf_checkpoint, tiny_config

__all__ = [
    "Checkpoint", "build_model", "check_state_dict", "create_tiny_checkpoint", "detect_format",
    "expected_shapes", "fingerprint_files", "load_checkpoint", "load_model", "random_state_dict",
    "save_hf_checkpoint", "tiny_config", "torch_dtype",
]
