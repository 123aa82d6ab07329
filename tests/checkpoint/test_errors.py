"""Every loader error names the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from llama_trt.checkpoint import load_checkpoint
from llama_trt.errors import CheckpointError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("good") / "m")


def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope.*Hugging Face folder"):
        load_checkpoint(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json nor params.json"):
        load_checkpoint(tmp_path)


def test_weight_file_instead_of_folder(good):
    with pytest.raises(CheckpointError, match="pass the checkpoint folder"):
        load_checkpoint(good / "model.safetensors")


def test_not_llama_model_type(good, tmp_path):
    p = copy(good, tmp_path)
    edit_config(p, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2' \(GPT2LMHeadModel\) is not a LLaMA"):
        load_checkpoint(p)


def test_unsupported_variant(good, tmp_path):
    p = copy(good, tmp_path)
    edit_config(p, attention_bias=True)
    with pytest.raises(CheckpointError, match="unsupported LLaMA variant: attention_bias=true"):
        load_checkpoint(p)


def test_bad_json(good, tmp_path):
    p = copy(good, tmp_path)
    (p / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_checkpoint(p)


def test_missing_tensor(good, tmp_path):
    p = copy(good, tmp_path)
    sd = load_file(p / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, p / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(p)


def test_shape_mismatch(good, tmp_path):
    p = copy(good, tmp_path)
    sd = load_file(p / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(sd, p / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.layers.0.self_attn.k_proj.weight: "
                                              r"checkpoint has \[48, 64\], config implies \[32, 64\]"):
        load_checkpoint(p)


def test_unexpected_tensor(good, tmp_path):
    p = copy(good, tmp_path)
    sd = load_file(p / "model.safetensors")
    sd["transformer.h.0.attn.bias"] = torch.zeros(3)
    save_file(sd, p / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*transformer.h.0.attn.bias"):
        load_checkpoint(p)


def test_truncated_safetensors(good, tmp_path):
    p = copy(good, tmp_path)
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors file \(truncated"):
        load_checkpoint(p)


def test_missing_shard(good, tmp_path):
    p = copy(good, tmp_path)
    (p / "model.safetensors").unlink()
    (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard.* missing: model-00001-of-00002.safetensors"):
        load_checkpoint(p)


def test_no_weights(good, tmp_path):
    p = copy(good, tmp_path)
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(p)


def test_truncated_llama2c(stories260k, tmp_path):
    p = tmp_path / "s.bin"
    p.write_bytes(stories260k.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"s.bin: file truncated: \d+ bytes, the header implies \d+"):
        load_checkpoint(p)


def test_garbage_llama2c(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="implausible llama2.c header"):
        load_checkpoint(p)


def test_meta_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(CheckpointError, match=r"params.json found but no consolidated.\*.pth"):
        load_checkpoint(tmp_path)


def test_meta_truncated_pth(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"tok_embeddings.weight": torch.zeros(10, 64)}, tmp_path / "consolidated.00.pth")
    data = (tmp_path / "consolidated.00.pth").read_bytes()
    (tmp_path / "consolidated.00.pth").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: cannot read PyTorch weights"):
        load_checkpoint(tmp_path)


def test_meta_foreign_tensor(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.weight'"):
        load_checkpoint(tmp_path)
