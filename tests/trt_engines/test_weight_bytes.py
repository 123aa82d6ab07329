"""Quantized engines keep their weights quantized: the builder's weight bytes against numpy
sums over the checkpoint's tensors (a seeded tied model, TensorRT-RTX ahead of time)."""

from __future__ import annotations

import glob

import pytest

pytestmark = pytest.mark.tensorrt

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SLACK = 64 * 1024  # norms, RoPE caches, int64 shape constants


def _checkpoint_params(ckpt) -> tuple[int, int, int]:
    """(linear-layer weights, their output channels, embedding table) element counts, from the
    safetensors files with numpy."""
    from safetensors.numpy import load_file

    tensors = {}
    for f in glob.glob(str(ckpt / "*.safetensors")):
        tensors.update(load_file(f))
    linear = [v for k, v in tensors.items() if k.endswith(tuple(f"{n}.weight" for n in LINEAR))]
    return (sum(v.size for v in linear), sum(v.shape[0] for v in linear),
            tensors["model.embed_tokens.weight"].size)


@pytest.fixture(scope="module")
def built(tied_exports, trt_backend, tmp_path_factory):
    from llama_trt.trt_engines import BuildOptions, build_engine

    root = tmp_path_factory.mktemp("weight_bytes")
    targets = ("89",) if trt_backend.is_rtx else ()
    made = {}

    def get(scheme: str, export_options=None, **kw):
        key = (scheme, tuple(sorted((export_options or {}).items())), tuple(sorted(kw.items())))
        if key not in made:
            made[key] = build_engine(tied_exports(scheme, **(export_options or {})), root / f"{scheme}{len(made)}",
                                     BuildOptions(max_seq=16, max_context=64, targets=targets, **kw))
        return made[key]

    return get


def test_fp16_engine_holds_every_weight_in_fp16(built, tied_exports):
    linear, _, table = _checkpoint_params(tied_exports.checkpoint)
    m = built("fp16")
    assert m.weight_bytes is not None and m.weight_bytes >= 2 * (linear + table)
    assert m.network_weight_bytes["fp16"] >= 2 * (linear + table)


def test_int8_weight_engine_keeps_int8_and_fp16_tables(built, tied_exports):
    """--no-quantize-lm-head: the float tied table goes in once, in fp16."""
    linear, channels, table = _checkpoint_params(tied_exports.checkpoint)
    m = built("int8-weight", export_options={"quantize_lm_head": False})
    assert m.precision == "int8" and m.weight_path["dequantize"] == 14
    assert m.network_weight_bytes["int8"] == linear
    # int8 GEMM weights + fp16 per-channel scales + the fp16 tied table, nothing widened
    expected = linear + 2 * channels + 2 * table
    assert expected <= m.weight_bytes <= expected + SLACK, (m.weight_bytes, expected)
    assert m.weight_bytes <= 0.6 * built("fp16").weight_bytes


def test_int8_blocked_head_stays_int8_in_the_engine(built, tied_exports):
    """The default head: the tied head is int8 in blocks of 32 along K (scale [K/32, V]); the
    engine holds it as int8 once (the embedding gathers its rows), with fp16 block scales."""
    linear, channels, table = _checkpoint_params(tied_exports.checkpoint)
    m = built("int8-weight")
    assert m.precision == "int8" and m.network_weight_bytes["int8"] == linear + table
    expected = linear + table + 2 * channels + 2 * (table // 32)
    assert expected <= m.weight_bytes <= expected + SLACK, (m.weight_bytes, expected)


def test_int4_engine_keeps_int4(built, tied_exports):
    from llama_trt.exporter import load_manifest

    linear, _, table = _checkpoint_params(tied_exports.checkpoint)
    group = int(load_manifest(tied_exports("int4-rtn")).to_dict().get("quantization", {}).get("group_size", 64))
    m = built("int4-rtn")
    assert m.precision == "int4"
    assert m.network_weight_bytes["int4"] == linear // 2
    # int4 GEMM weights + fp16 block scales; the tied table in at most 2 bytes an element
    expected = linear // 2 + 2 * (linear // group) + 2 * table
    assert m.weight_bytes <= expected + SLACK, (m.weight_bytes, expected)
    assert m.weight_bytes <= 0.4 * built("fp16").weight_bytes


def test_without_the_fp16_path_the_table_stays_fp32(built, tied_exports):
    """The pass is what shrinks the float part: off, the fp32 table goes in at 4 bytes an element."""
    linear, _, table = _checkpoint_params(tied_exports.checkpoint)
    m = built("int8-weight", export_options={"quantize_lm_head": False}, half_weights=False)
    assert m.weight_path is None
    assert m.weight_bytes >= linear + 4 * table
