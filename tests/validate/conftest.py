"""Session-scoped exports shared by the validate tests, and ways to break them on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TAMPERED_LAYER_TINY = 1


def _export(checkpoint, out, dtype):
    from llama_trt.exporter import export

    export(checkpoint, out, dtype=dtype, force=True, ort_check=False)
    return out


@pytest.fixture(scope="session")
def vroot(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="session")
def tiny_ckpt(vroot) -> Path:
    from llama_trt.checkpoint import create_tiny_checkpoint

    return create_tiny_checkpoint(vroot / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp32(vroot, tiny_ckpt) -> Path:
    return _export(tiny_ckpt, vroot / "tiny_fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_fp16(vroot, tiny_ckpt) -> Path:
    return _export(tiny_ckpt, vroot / "tiny_fp16", "fp16")


@pytest.fixture(scope="session")
def stories_fp32(vroot, stories260k) -> Path:
    return _export(stories260k, vroot / "stories_fp32", "fp32")


@pytest.fixture(scope="session")
def stories_fp16(vroot, stories260k) -> Path:
    return _export(stories260k, vroot / "stories_fp16", "fp16")


def _edit_copy(src: Path, dst: Path, edit) -> Path:
    """Copy an export folder and edit its model.onnx with plain onnx (re-saved)."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    edit(model)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def scale_mlp_weight(model, layer: int, scale: float = 1.05) -> str:
    """Scale layer ``layer``'s first MLP projection weight (found from the graph structure:
    the MatMul reading that layer's post-attention RMSNorm output). Returns its name."""
    from onnx import numpy_helper

    norms = [n for n in model.graph.node if n.domain == "llama_trt" and n.op_type == "RMSNorm"]
    y = norms[2 * layer + 1].output[0]
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == y)
    init = next(i for i in model.graph.initializer if i.name == matmul.input[1])
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((arr * scale).astype(arr.dtype), init.name))
    return init.name


def flip_rope_interleaved(model) -> int:
    count = 0
    for n in model.graph.node:
        if n.domain == "llama_trt" and n.op_type == "RotaryEmbedding":
            for a in n.attribute:
                if a.name == "interleaved":
                    a.i = 1 - a.i
                    count += 1
    assert count, "no RotaryEmbedding node carries an interleaved attribute"
    return count


@pytest.fixture(scope="session")
def tiny_tampered(vroot, tiny_fp32) -> Path:
    return _edit_copy(tiny_fp32, vroot / "tiny_tampered", lambda m: scale_mlp_weight(m, TAMPERED_LAYER_TINY))


@pytest.fixture(scope="session")
def tiny_rope_flipped(vroot, tiny_fp32) -> Path:
    return _edit_copy(tiny_fp32, vroot / "tiny_rope_flipped", flip_rope_interleaved)
