"""Fixtures: a tiny tied-embedding HF checkpoint, its fp32 export, and quantized copies of it."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def tied_ckpt(tmp_path_factory):
    """hidden 64 (g32/g64 divide it), intermediate 96 (g64 does not: down_proj falls back to int8)."""
    from tests.conftest import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("tied") / "ckpt", seed=3, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tied_fp32(tied_ckpt, tmp_path_factory):
    from llama_trt.exporter import export

    out = tmp_path_factory.mktemp("tied-fp32") / "fp32"
    export(tied_ckpt, out, dtype="fp32", ort_check=False)
    return out


@pytest.fixture(scope="session")
def quantized(tied_ckpt, tied_fp32, tmp_path_factory):
    """quantized("int4-rtn", group_size=32) -> (folder, manifest), cached per arguments."""
    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.quantize.pipeline import quantize_folder
    from llama_trt.quantize.schemes import parse_options

    state = load_checkpoint(tied_ckpt).state_dict
    cache = {}

    def get(scheme: str, **kw):
        key = (scheme, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(scheme)
            cache[key] = (out, quantize_folder(tied_fp32, out, parse_options(scheme, **kw), state_dict=state))
        return cache[key]

    return get
