"""GGUF input: synthetic llama GGUF files written here with gguf.GGUFWriter.

References: the transformers model the file was made from (logits), transformers' own GGUF
loading of the file, and numpy decoders of each block format written below from ggml's
block layouts (ggml-common.h / ggml-quants.c), independent of gguf.quants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# ---------------------------------------------------------------- numpy block decoders


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _k_scales(scales: np.ndarray):
    """6-bit scales and mins of the 8 sub-blocks of a Q4_K/Q5_K block ([blocks, 12] bytes)."""
    s = scales.astype(np.int32)
    sc = np.empty((len(s), 8), np.int32)
    mn = np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def ref_q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def ref_q4_0(b):
    q = b[:, 2:].astype(np.int32)
    return _f16(b[:, :2]) * (np.concatenate([q & 0xF, q >> 4], axis=1) - 8)


def ref_q4_1(b):
    q = b[:, 4:].astype(np.int32)
    return _f16(b[:, :2]) * np.concatenate([q & 0xF, q >> 4], axis=1) + _f16(b[:, 2:4])


def _ref_k(b, qh):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, -128:].astype(np.int32)
    out = []
    for sub in range(8):  # sub-block 2k: low nibbles of qs[32k:32k+32], 2k+1: high nibbles
        chunk = qs[:, 32 * (sub // 2): 32 * (sub // 2) + 32]
        q = chunk & 0xF if sub % 2 == 0 else chunk >> 4
        if qh is not None:
            q = q + 16 * ((qh.astype(np.int32) >> sub) & 1)
        out.append(d * sc[:, sub:sub + 1] * q - dmin * mn[:, sub:sub + 1])
    return np.concatenate(out, axis=1)


def ref_q4_k(b):
    return _ref_k(b, None)


def ref_q5_k(b):
    return _ref_k(b, b[:, 16:48])


def ref_q6_k(b):
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    out = np.empty((len(b), 256), np.float32)
    for half in range(2):
        l_, h_, s_ = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], sc[:, 8 * half:8 * half + 8]
        for part, (lo, shift_l, shift_h) in enumerate(((0, 0, 0), (32, 0, 2), (0, 4, 4), (32, 4, 6))):
            q = ((l_[:, lo:lo + 32] >> shift_l) & 0xF) | (((h_ >> shift_h) & 3) << 4)
            scale = np.repeat(s_[:, 2 * part:2 * part + 2], 16, axis=1)
            out[:, 128 * half + 32 * part:128 * half + 32 * part + 32] = d * scale * (q - 32)
    return out


# type -> (block bytes, values per block, byte offsets of fp16 scale fields, decoder)
BLOCKS = {
    T.Q8_0: (34, 32, (0,), ref_q8_0),
    T.Q4_0: (18, 32, (0,), ref_q4_0),
    T.Q4_1: (20, 32, (0, 2), ref_q4_1),
    T.Q4_K: (144, 256, (0, 2), ref_q4_k),
    T.Q5_K: (176, 256, (0, 2), ref_q5_k),
    T.Q6_K: (210, 256, (208,), ref_q6_k),
}


def random_blocks(kind, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random block bytes with small finite fp16 scales: [rows, bytes per row] uint8."""
    size, per, scale_offsets, _ = BLOCKS[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // per, size), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, off:off + 2] = rng.uniform(0.001, 0.02, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // per * size)


def reference_values(kind, raw: np.ndarray, cols: int) -> np.ndarray:
    size, per, _, decode = BLOCKS[kind]
    return decode(raw.reshape(-1, size)).reshape(raw.shape[0], cols)


# ---------------------------------------------------------------- writing GGUF files


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute: HF rotate_half rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.weight"


def write_gguf(path, cfg, tensors: dict, arch: str = "llama"):
    """tensors: gguf name -> float32 array, or (raw uint8 blocks, GGMLQuantizationType)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.05 * torch.randn_like(p))
    return model


def hf_to_gguf(model, path, types=None):
    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.float().numpy()
        if "q_proj" in name:
            w = permute_like_llama_cpp(w, cfg.num_attention_heads)
        elif "k_proj" in name:
            w = permute_like_llama_cpp(w, cfg.num_key_value_heads)
        tensors[gguf_name(name)] = np.ascontiguousarray(w)
    tensors.update(types or {})
    return write_gguf(path, cfg, tensors)


def our_logits(path, ids):
    from llama_trt.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(path)
    with torch.no_grad():
        out = build_model(ckpt)(ids)
    return ckpt, out[0] if isinstance(out, tuple) else out


def transformers_gguf_logits(path, ids):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


IDS = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 40]])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_gives_the_source_model(tmp_path, tie):
    model = tiny_hf(tie)
    path = hf_to_gguf(model, tmp_path / "m.gguf")
    ckpt, got = our_logits(path, IDS)
    assert ckpt.format == "gguf" and ckpt.config.tie_word_embeddings is tie
    assert (ckpt.config.num_heads, ckpt.config.num_kv_heads, ckpt.config.head_dim) == (4, 2, 64)
    with torch.no_grad():
        want = model(IDS).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - transformers_gguf_logits(path, IDS)).abs().max() < 1e-5


def test_quantized_types_load_like_transformers(tmp_path):
    model = tiny_hf(False, seed=1)
    quantized = {"token_embd.weight": (random_blocks(T.Q8_0, 64, 256, 0), T.Q8_0)}
    per_layer = (("attn_q", T.Q4_K, 256), ("attn_k", T.Q5_K, 128), ("attn_v", T.Q6_K, 128),
                 ("attn_output", T.Q4_0, 256), ("ffn_gate", T.Q4_1, 256))
    for layer in range(2):
        for k, (name, kind, rows) in enumerate(per_layer):
            quantized[f"blk.{layer}.{name}.weight"] = (random_blocks(kind, rows, 256, 10 * layer + k), kind)
    f16 = model.model.layers[0].mlp.up_proj.weight.detach().numpy().astype(np.float16)
    quantized["blk.0.ffn_up.weight"] = f16
    path = hf_to_gguf(model, tmp_path / "q.gguf", quantized)
    ckpt, got = our_logits(path, IDS)
    assert torch.equal(ckpt.state_dict["model.layers.0.mlp.up_proj.weight"], torch.from_numpy(f16.astype(np.float32)))
    assert (got - transformers_gguf_logits(path, IDS)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_dequantization_matches_the_block_format(tmp_path, kind):
    from llama_trt.checkpoint.gguf import dequantize_tensor

    raw = random_blocks(kind, 4, 512, seed=int(kind))
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("x", raw, raw_dtype=kind)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tensor = gguf.GGUFReader(path).tensors[0]
    got = dequantize_tensor(tensor, path)
    assert got.shape == (4, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_values(kind, raw, 512), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", [T.F32, T.F16, T.BF16])
def test_float_types_are_exact(tmp_path, kind):
    from llama_trt.checkpoint.gguf import dequantize_tensor

    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    if kind == T.BF16:
        x = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bf16
        stored = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(3, 128)
        tensors = (stored, kind)
    else:
        if kind == T.F16:
            x = x.astype(np.float16).astype(np.float32)
        tensors = x.astype(np.float16) if kind == T.F16 else x
    path = tmp_path / "f.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if isinstance(tensors, tuple):
        w.add_tensor("x", tensors[0], raw_dtype=tensors[1])
    else:
        w.add_tensor("x", tensors)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    np.testing.assert_array_equal(dequantize_tensor(gguf.GGUFReader(path).tensors[0], path), x)


def _cli(*args):
    from click.testing import CliRunner

    from llama_trt.cli import main

    return CliRunner().invoke(main, list(map(str, args)))


def test_non_llama_architecture_is_one_line_error(tmp_path):
    model = tiny_hf(False)
    path = hf_to_gguf(model, tmp_path / "m.gguf")

    data = path.read_bytes().replace(b"llama", b"qwen2", 1)
    bad = tmp_path / "qwen.gguf"
    bad.write_bytes(data)
    r = _cli("info", bad)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "architecture 'qwen2' is not supported" in lines[0]


def test_unsupported_tensor_type_is_one_line_error(tmp_path):
    model = tiny_hf(False)
    raw = np.random.default_rng(0).integers(0, 256, size=(256, 256 // 256 * 84), dtype=np.uint8)  # Q2_K: 84 B/256
    path = hf_to_gguf(model, tmp_path / "m.gguf", {"blk.0.attn_q.weight": (np.tile(raw, 1), T.Q2_K)})
    r = _cli("info", path)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "blk.0.attn_q.weight has type Q2_K" in lines[0], r.output


# ---------------------------------------------------------------- the real GGUF file (SmolLM2)

SMOL_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 28, 5, 99, 12000, 49151]])


@pytest.fixture(scope="module")
def smollm2_reference_logits(smollm2_gguf):
    return transformers_gguf_logits(smollm2_gguf, SMOL_IDS)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf, smollm2_reference_logits):
    ckpt, got = our_logits(smollm2_gguf, SMOL_IDS)
    assert (ckpt.config.num_heads, ckpt.config.num_kv_heads, ckpt.config.tie_word_embeddings) == (9, 3, True)
    assert (got - smollm2_reference_logits).abs().max() <= 1e-4
    names = {f.name for f in ckpt.tokenizer_files}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= names


@pytest.mark.slow
def test_smollm2_gguf_export_matches_transformers(tmp_path, smollm2_gguf, smollm2_reference_logits):
    import json

    from transformers import AutoTokenizer

    from llama_trt.runtime.artifact import resolve_artifact
    from llama_trt.runtime.sessions.ort_session import OrtSession

    out = tmp_path / "export"
    r = _cli("export", smollm2_gguf, "-o", out)
    assert r.exit_code == 0, r.output
    session = OrtSession.from_artifact(resolve_artifact(out))
    ids = SMOL_IDS.numpy()
    logits = session.prefill(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    assert np.abs(logits - smollm2_reference_logits.numpy()).max() <= 1e-4
    # the tokenizer files transformers made from the GGUF metadata travel with the export
    ours = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, add_generation_prompt=True)
    assert ours("Hello world")["input_ids"] == ref("Hello world")["input_ids"]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
