"""The quantization schemes on the real model, SmolLM2-135M-Instruct (slow; cached fixture).

One fp32 export; each scheme is quantized from it and certified by validate's teacher-forced
certificate (the fp32 torch model over the built-in corpus of real English, ~2,700 tokens,
the export run by ONNX Runtime as ``run`` runs it). Thresholds: the issue's KL <= 0.004 / top-1 >=
96.5% for int8-weight; for int4, AWQ must beat plain rounding (KL <= 0.7x, the issue's target) and the
file must be < 0.4x an fp16 file.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_hf, smollm2_fp32_export, tmp_path_factory):
    from llama_trt.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("smol-quant")
    (root / "fp32").symlink_to(smollm2_fp32_export, target_is_directory=True)  # the session's shared export
    return root, load_checkpoint(smollm2_hf)


@pytest.fixture(scope="module")
def certified(smol):
    from llama_trt.quantize.pipeline import certify_export, quantize_folder
    from llama_trt.quantize.schemes import parse_options

    root, ckpt = smol
    cache = {}

    def get(scheme: str):
        if scheme not in cache:
            out = root / scheme
            out.mkdir()
            man = quantize_folder(root / "fp32", out, parse_options(scheme), state_dict=ckpt.state_dict,
                                  tokenizer_files=ckpt.tokenizer_files, ort_check=False)
            for f in ckpt.tokenizer_files:
                shutil.copy2(f, out)
            cache[scheme] = (out, certify_export(out, ckpt, man))
        return cache[scheme]

    return get


def _fp16_bytes(ckpt) -> int:
    """An fp16 file holds every parameter once in 2 bytes (a tied head shares the table)."""
    tied = ckpt.config.tie_word_embeddings
    return 2 * sum(int(np.prod(v.shape)) for k, v in ckpt.state_dict.items() if not (tied and k == "lm_head.weight"))


def test_int8_weight_meets_the_issue_target(certified):
    """Issue 13: KL <= 0.004 and top-1 >= 96.5% as `run` executes it (ONNX Runtime CPU, MatMulNBits
    at its default accuracy level), with the default int8 head (blocks of 32 along K, its top 16
    logits rescored in fp32 by the session). Measured with AWQ + GPTQ on 8,192 calibration tokens:
    KL 0.0033, top-1 97.1% with ORT's own kernel blocks of 32 (head float: 0.0032 / 96.7%; head int8
    without the rescoring: 0.0037 / 96.45%; per-channel head: 0.0042 / 96.0%; AWQ alone, head float:
    0.0039 / 96.2%); the export's certificate tries the faster blocks of 64 first and keeps them
    (KL 0.0039 / 96.8%, +3-7% decode; blocks of 128: 0.0051 / 95.9%, would miss)."""
    folder, man = certified("int8-weight")
    cert = man.certificate
    assert cert["tokens"] >= 2000
    assert cert["kl"] <= 0.004 and cert["top1"] >= 0.965 and cert["passed"], cert
    kernel = man.quantization["ort_kernel"]
    assert [t["int8_block"] for t in kernel["trials"]] == [64] and kernel["int8_block"] == 64, kernel
    assert kernel["trials"][0]["kl"] == round(cert["kl"], 6)
    gptq = man.quantization["gptq"]
    assert gptq["hessian_tokens"] >= 8000 and gptq["output_error_vs_rtn"] < 0.5, gptq
    assert man.quantization["lm_head"] == "int8" and man.quantization["lm_head_block_size"] == 32


def test_int4_awq_beats_rtn_and_shrinks_the_file(certified, smol):
    _, ckpt = smol
    _, rtn = certified("int4-rtn")
    folder, awq = certified("int4-awq")
    # measured: awq g64 KL 0.299 / top-1 72.1% with the head's candidates found by its int4 copy in
    # blocks of 64 (0.267 with the int8 head itself), rtn g64 KL 0.61 / 56% with either (issue: awq <= 0.7x rtn)
    assert awq.certificate["kl"] < 0.7 * rtn.certificate["kl"], (awq.certificate, rtn.certificate)
    kernel = awq.quantization["ort_kernel"]
    assert kernel["head_scan_bits"] == 4 and [t["head_scan_bits"] for t in kernel["trials"]] == [4], kernel
    assert kernel["head_scan_block"] == kernel["trials"][0]["head_scan_block"] == 64, kernel
    assert kernel["trials"][0]["kl"] == round(awq.certificate["kl"], 6)
    # rtn misses with the int4 scan, then with the int8 head too: the most accurate form is kept
    assert [(t["head_scan_bits"], t["passed"]) for t in rtn.quantization["ort_kernel"]["trials"]] == [(4, False), (8, False)]
    assert rtn.quantization["ort_kernel"]["head_scan_bits"] == 8
    assert awq.certificate["top1"] > rtn.certificate["top1"]
    assert awq.certificate["passed"] and not rtn.certificate["passed"]  # the int4 gate tells them apart
    size = sum(f.stat().st_size for f in folder.iterdir() if "onnx" in f.name)
    assert size < 0.4 * _fp16_bytes(ckpt), (size, _fp16_bytes(ckpt))
    q = awq.quantization
    assert q["scheme"] == "int4-awq" and q["group_size"] == 64 and q["lm_head"] == "int8"
    assert q["weight_bytes"]["int4"] > q["weight_bytes"]["int8"] > q["weight_bytes"].get("fp32", 0)
