"""Hugging Face ids (org/name) resolve from the local Hugging Face cache, offline; a missing one
says how to download it. The cache is a fake one in tmp_path, laid out as huggingface_hub lays
out its own (models--org--name/refs/main -> snapshots/<commit>/)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main
from tests.conftest import make_hf_checkpoint

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    make_hf_checkpoint(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # REPO_ID is not a local path here
    return repo / "snapshots" / COMMIT


def test_cached_id_resolves_to_its_snapshot(hf_cache):
    from huggingface_hub import snapshot_download

    from llama_trt.checkpoint.hub import resolve_checkpoint

    want = snapshot_download(REPO_ID, local_files_only=True, cache_dir=str(hf_cache.parents[2]))  # the reference
    assert resolve_checkpoint(REPO_ID).resolve() == hf_cache.resolve() == type(hf_cache)(want).resolve()


def test_info_export_and_run_take_a_cached_id(hf_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["info", REPO_ID, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["config"]["hidden_size"] == 64
    r = runner.invoke(main, ["export", REPO_ID, "-o", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["source_checkpoint"] == str(hf_cache.resolve())
    r = runner.invoke(main, ["run", REPO_ID, "--backend", "torch", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                             "--json"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command", [["info"], ["export", "--dtype", "fp32"], ["run", "--prompt-ids", "1"]])
def test_missing_id_says_how_to_download(hf_cache, tmp_path, command):
    args = [command[0], "other-org/not-cached", *command[1:]]
    if command[0] == "export":
        args += ["-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint not found: other-org/not-cached"), r.output
    assert "hf download other-org/not-cached" in lines[0] and "huggingface-cli download" in lines[0]
