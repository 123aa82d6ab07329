"""Session-scoped exports and engine builds shared by the trt_engines tests.

Exports (torch) are made lazily, once per session; builds need TensorRT-RTX or full
TensorRT and skip with the reason when neither is importable.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def trt_backend_or_reason():
    from llama_trt.errors import BackendUnavailableError
    from llama_trt.trt_engines.backend import detect_backend

    try:
        return detect_backend(), ""
    except BackendUnavailableError as e:
        return None, str(e)


@pytest.fixture(scope="session")
def trt_backend():
    backend, reason = trt_backend_or_reason()
    if backend is None:
        pytest.skip(f"needs tensorrt_rtx_bindings or tensorrt: {reason}")
    return backend


@pytest.fixture(scope="session")
def rtx_targets(trt_backend):
    """AOT targets for the tests: 89 and 120 on TensorRT-RTX, none on full TensorRT."""
    return ("89", "120") if trt_backend.is_rtx else ()


@pytest.fixture(scope="session")
def exports(tmp_path_factory, stories260k):
    """exports(kind, dtype) -> export folder; kind "tiny" (HF half pairing) or "stories" (interleaved)."""
    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("trt_exports")
    made: dict[tuple[str, str], Path] = {}
    ckpts = {}

    def get(kind: str, dtype: str = "fp32") -> Path:
        key = (kind, dtype)
        if key not in made:
            if kind == "tiny":
                if "tiny" not in ckpts:
                    ckpts["tiny"] = create_tiny_checkpoint(root / "tiny_ckpt", seed=0)
                src = ckpts["tiny"]
            else:
                src = stories260k
            out = root / f"{kind}_{dtype}"
            export(src, out, dtype=dtype, ort_check=False)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def engines(tmp_path_factory, exports, trt_backend, rtx_targets):
    """engines(dtype) -> (engine dir, manifest) built from the tiny export with the library API."""
    from llama_trt.trt_engines import BuildOptions, build_engine

    root = tmp_path_factory.mktemp("trt_engines")
    built = {}

    def get(dtype: str = "fp32"):
        if dtype not in built:
            out = root / f"tiny_{dtype}"
            m = build_engine(exports("tiny", dtype), out, BuildOptions(
                max_batch=2, max_seq=32, max_context=128, targets=rtx_targets))
            built[dtype] = (out, m)
        return built[dtype]

    return get


TINY_TIED = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4,
                 num_kv_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tied_exports(tmp_path_factory):
    """scheme -> export folder of a seeded model with a tied embedding and matrices big enough for
    the fp16 weight path: "fp32", "fp16", or a --quantize scheme (fp32 activations, no certificate)."""
    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("halfweights")
    ckpt = create_tiny_checkpoint(root / "ckpt", seed=3, **TINY_TIED)
    made = {}

    def get(scheme: str, **options):
        """``options``: quantization keywords (``quantize_lm_head=True``)."""
        key = (scheme, tuple(sorted(options.items())))
        if key not in made:
            out = root / f"{scheme}{len(made)}"
            kw = {} if scheme == "fp32" else {"quantize": scheme, "certify": False, **options}
            if scheme == "fp16":
                export(ckpt, out, dtype="fp16", ort_check=False)
            else:
                export(ckpt, out, dtype="fp32", ort_check=False, **kw)
            made[key] = out
        return made[key]

    get.checkpoint = ckpt
    return get
