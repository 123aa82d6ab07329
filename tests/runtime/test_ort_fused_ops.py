"""OrtSession(fused_ops=True): the session-time rewrite to ORT's fused kernels (opset-23
RotaryEmbedding / RMSNormalization / Attention) gives the same logits and greedy ids as the
exported graph run as is, for prefill with left padding and decode steps."""

from __future__ import annotations

import numpy as np
import pytest

from llama_trt.runtime import GenerationConfig, generate, generate_batch
from llama_trt.runtime.sessions.ort_session import OrtSession

# two prompts, the second left-padded by 3
PROMPTS = [[1, 17, 33, 5, 90, 41, 7], [1, 60, 2 + 9, 44]]
DECODE_STEPS = 5


def _sessions(export_dir):
    from llama_trt.runtime.artifact import resolve_artifact

    art = resolve_artifact(export_dir)
    return (OrtSession.from_artifact(art, fused_ops=False), OrtSession.from_artifact(art, fused_ops=True))


def _drive(session, next_ids=None):
    """Prefill the left-padded batch, then DECODE_STEPS steps feeding ``next_ids`` (or argmax).
    Returns ([prefill logits, step logits...], mask, ids fed)."""
    b, width = len(PROMPTS), max(map(len, PROMPTS))
    ids = np.zeros((b, width), dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out = [session.prefill(ids, mask, pos)]
    fed = []
    for k in range(DECODE_STEPS):
        nxt = out[-1][:, -1].argmax(-1) if next_ids is None else next_ids[k]
        fed.append(nxt)
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        out.append(session.step(nxt[:, None], mask, pos))
    return out, mask, fed


def _check_equivalent(export_dir, atol, packed=True):
    plain, fused = _sessions(export_dir)
    assert plain.describe()["fused_ops"] is False
    d = fused.describe()
    assert d["fused_ops"] is True, d["fused_ops_rewrite"]
    cfg = plain.config
    rewrite = d["fused_ops_rewrite"]
    assert rewrite["Attention(opset 23)"] == f"{cfg.num_layers}/{cfg.num_layers}"
    assert rewrite["RotaryEmbedding(opset 23)"] == 2 * cfg.num_layers
    assert rewrite["Attention on [batch, seq, heads*head_dim] (head Reshape/Transpose removed)"] == cfg.num_layers
    assert rewrite["SkipSimplifiedLayerNormalization(com.microsoft)"] == 2 * cfg.num_layers
    # q/k/v -> 1 per layer; gate/up, o, down and the lm head stay
    before, after = map(int, rewrite["MatMuls with one input and constant weights packed (+ Split)"].split(" -> "))
    assert before - after == (2 * cfg.num_layers if packed else 0)

    ref, mask, fed = _drive(plain)
    got, _, _ = _drive(fused, next_ids=fed)  # same inputs even if an argmax were to flip
    width = max(map(len, PROMPTS))
    valid = mask[:, :width].astype(bool)  # prefill rows at padded positions are don't-care
    assert np.isfinite(got[0]).all()
    np.testing.assert_allclose(got[0][valid], ref[0][valid], atol=atol, rtol=0)
    for r, g in zip(ref[1:], got[1:]):
        np.testing.assert_allclose(g, r, atol=atol, rtol=0)
    # GroupQueryAttention sessions rotate a batched prefill by arange(seq) in every row and keep
    # each row's offset (its left padding): those rows' keys are rotated by shifted positions
    shifted = fused.kv_position_offsets().reshape(-1) != 0
    if fused.kv_layout == "shared-buffer":
        assert fused.kv_position_offsets().reshape(-1).tolist() == [width - len(p) for p in PROMPTS]
    for (rk, rv), (gk, gv) in zip(plain.kv_cache(), fused.kv_cache()):
        # cache rows at padded positions hold junk on both sides; compare the attended ones
        m = mask[:, None, :, None].astype(bool)
        np.testing.assert_allclose(np.where(m, gk, 0)[~shifted], np.where(m, rk, 0)[~shifted], atol=atol, rtol=0)
        np.testing.assert_allclose(np.where(m, gv, 0), np.where(m, rv, 0), atol=atol, rtol=0)

    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    assert generate(fused, PROMPTS[0], gen).token_ids == generate(plain, PROMPTS[0], gen).token_ids
    a = generate_batch(fused, PROMPTS, gen)
    b = generate_batch(plain, PROMPTS, gen)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    root = tmp_path_factory.mktemp("fused")
    ckpt = create_tiny_checkpoint(root / "ckpt", seed=3)
    out = {}
    for dtype in ("fp32", "fp16"):
        export(ckpt, root / dtype, dtype=dtype)
        out[dtype] = root / dtype
    return out


# fp16: the fused kernels round differently (fp32 inside); the fp16 export itself is ~2e-3 off fp32
@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_fused_ops_equal_plain_tiny(tiny_exports, dtype, atol):
    _check_equivalent(tiny_exports[dtype], atol)


def test_fused_ops_equal_plain_stories260k(stories_export):
    # stories260K: interleaved RoPE, head_dim 8 (a non power-of-two attention scale)
    _check_equivalent(stories_export, 1e-4)


def test_fused_ops_default_on_cpu_and_reported(ort_session, stories_export):
    from llama_trt.runtime import open_session

    d = ort_session.describe()
    assert d["fused_ops"] is True and d["intra_op_allow_spinning"] is True
    assert "Attention(opset 23)" in d["fused_ops_rewrite"]
    # the shared-CPU setting: ORT workers sleep instead of spinning; same logits
    quiet = open_session(stories_export, "onnxruntime", allow_spinning=False)
    assert quiet.describe()["intra_op_allow_spinning"] is False
    ids, mask, pos = np.array([[1, 300, 301]]), np.ones((1, 3), dtype=np.int64), np.arange(3)[None]
    np.testing.assert_array_equal(quiet.prefill(ids, mask, pos), ort_session.prefill(ids, mask, pos))


def test_fused_ops_external_data(tiny_exports, tmp_path, monkeypatch):
    """A model whose weights live in an external data file: the rewrite keeps reading them from
    the export folder (packed MatMuls through a Concat ORT folds at open), and writes nothing there."""
    import shutil

    import onnx

    from llama_trt.runtime.sessions import ort_cache

    monkeypatch.setattr(ort_cache, "INLINE_MAX_BYTES", 64)  # tiny weights stay external too

    src = tiny_exports["fp32"]
    dst = tmp_path / "ext"
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    onnx.save(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=256)
    before = sorted(p.name for p in dst.iterdir())
    _check_equivalent(dst, 1e-4)
    assert sorted(p.name for p in dst.iterdir()) == before
