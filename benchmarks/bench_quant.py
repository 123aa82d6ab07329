"""Quantization schemes on one checkpoint: accuracy certificate, file size, weight bytes. Prints JSON.

    python benchmarks/bench_quant.py [--checkpoint HF_DIR] [--base FP32_EXPORT] [--out DIR]
        [--schemes int8-weight,int8-weight:floathead,int4-rtn,int4-awq,int4-awq:head,int4-awq:32:zp] [--genai]

Default checkpoint: SmolLM2-135M-Instruct (``llama_trt.checkpoint.zoo.reference_hf_folder``).
The fp32 export is made once (or ``--base`` reuses one), each scheme is quantized from it
(``quantize_folder``) and certified with validate's teacher-forced certificate (KL, KL p99,
top-1, ppl ratio over the built-in corpus against the fp32 torch model, on ONNX Runtime CPU
as ``run`` executes it). A scheme is ``NAME[:GROUP][:zp][:head|:floathead]`` (``head``: the lm
head at the scheme's bits, ``--quantize-lm-head``; ``floathead``: kept float, ``--no-quantize-lm-head``;
neither: the scheme's default, int8 in blocks of 32).

``--genai``: also build onnxruntime-genai's int8 and int4 models of the same checkpoint
(``python -m onnxruntime_genai.models.builder -p int8|int4 -e cpu``) and score them with the
same text, reference and metrics (their logits through ``onnxruntime``; accuracy and file size).

No timings: decode speed is measured by benchmarks/bench_runtime_cpu.py on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _parse_scheme(spec: str) -> tuple[str, dict]:
    name, *rest = spec.split(":")
    kw: dict = {}
    for r in rest:
        if r == "zp":
            kw["int4_zero_point"] = True
        elif r.isdigit():
            kw["group_size"] = int(r)
        elif r == "head":
            kw["quantize_lm_head"] = True
        elif r == "floathead":
            kw["quantize_lm_head"] = False
    return name, kw


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))


def _cert_dict(cert) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in
            dict(kl=cert.kl, kl_p99=cert.kl_p99, top1=cert.top1, ppl_ratio=cert.ppl_ratio, tokens=cert.tokens,
                 passed=cert.passed, thresholds=cert.thresholds).items()}


def run_scheme(spec: str, base: Path, out: Path, ckpt, reference=None) -> dict:
    from llama_trt.quantize.pipeline import quantize_folder
    from llama_trt.quantize.schemes import parse_options
    from llama_trt.validate.teacher_forced import certify

    name, kw = _parse_scheme(spec)
    folder = out / spec.replace(":", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    manifest = quantize_folder(base, folder, parse_options(name, **kw), state_dict=ckpt.state_dict,
                               tokenizer_files=ckpt.tokenizer_files, ort_check=False)
    seconds = time.perf_counter() - t
    for f in ckpt.tokenizer_files:
        shutil.copy2(f, folder / Path(f).name)
    q = manifest.quantization
    cert = certify(folder, ckpt, scheme=name, reference=reference)
    return {"scheme": name, **kw, "file_mib": round(_size(folder) / 2**20, 2),
            "weight_mib": {k: round(v / 2**20, 2) for k, v in q["weight_bytes"].items()},
            "lm_head": q.get("lm_head"), "int8_fallback": len(q.get("int8_fallback") or []),
            "quantize_seconds_loaded_machine": round(seconds, 1), "certificate": _cert_dict(cert)}


def run_genai(checkpoint: Path, out: Path, ckpt, precision: str = "int4", reference=None) -> dict:
    """onnxruntime-genai's ``-p PRECISION`` CPU build of the same checkpoint, scored like ours."""
    import onnxruntime as ort

    from llama_trt.checkpoint import build_model
    from llama_trt.validate.corpus import load_eval_text
    from llama_trt.validate.teacher_forced import (
        DEFAULT_WINDOW, gate_failures, teacher_forced, text_tokens, torch_logits_fn,
    )
    from llama_trt.validate.tolerances import default_tolerances
    from llama_trt.runtime.tokenizer import load_tokenizer

    folder = out / f"genai-{precision}"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint), "-o", str(folder),
           "-p", precision, "-e", "cpu", "-c", str(out / "genai-cache")]
    subprocess.run(cmd, check=True, capture_output=True)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name: i for i in sess.get_inputs()}
    cfg = ckpt.config

    def logits(ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        for n, i in names.items():
            if n.startswith("past_key_values"):
                dt = np.float16 if "float16" in i.type else np.float32
                feeds[n] = np.zeros((b, cfg.num_kv_heads, 0, cfg.head_dim), dt)
        return sess.run(["logits"], feeds)[0].astype(np.float32)

    tokens = text_tokens(load_eval_text(None), load_tokenizer(Path(ckpt.path)), DEFAULT_WINDOW, cfg.vocab_size)
    ref_fn = reference.logits_fn() if reference is not None else torch_logits_fn(build_model(ckpt, "fp32"))
    values = teacher_forced(ref_fn, logits, tokens.windows)
    gates = default_tolerances(precision, "int4" if precision == "int4" else "int8-weight").metrics
    return {"scheme": f"onnxruntime-genai {precision} (builder -p {precision} -e cpu)", "file_mib": round(
        sum(f.stat().st_size for f in folder.iterdir() if "onnx" in f.name) / 2**20, 2),
        "certificate": {**{k: round(float(v), 6) for k, v in values.items()},
                        "passed": not gate_failures(values, gates)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--base", type=Path, default=None, help="an existing fp32 export of the checkpoint")
    ap.add_argument("--out", type=Path, default=Path("bench-quant"))
    ap.add_argument("--schemes", default="int8-weight,int8-weight:floathead,int4-rtn,int4-awq,int4-awq:head,int4-awq:32:zp")
    ap.add_argument("--genai", action="store_true", help="also score onnxruntime-genai's int8 and int4 builds")
    args = ap.parse_args(argv)

    from llama_trt.checkpoint import load_checkpoint

    if args.checkpoint is None:
        from llama_trt.checkpoint.zoo import reference_hf_folder

        args.checkpoint = reference_hf_folder()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.checkpoint)
    base = args.base
    if base is None:
        from llama_trt.exporter import export

        base = args.out / "fp32"
        if not (base / "manifest.json").is_file():
            export(args.checkpoint, base, dtype="fp32", ort_check=False, force=True)
    results = {"checkpoint": str(args.checkpoint), "fp32_file_mib": round(_size(base) / 2**20, 2),
               "fp16_weights_mib": round(sum(int(np.prod(v.shape)) for k, v in ckpt.state_dict.items()
                                             if k != "lm_head.weight" or not ckpt.config.tie_word_embeddings)
                                         * 2 / 2**20, 2),
               "schemes": []}
    from llama_trt.validate.reference import TorchReference

    reference = TorchReference(ckpt)  # the fp32 logits of the certificate text, computed once for all
    for spec in [s for s in args.schemes.split(",") if s]:
        results["schemes"].append(run_scheme(spec, base, args.out, ckpt, reference))
        print(json.dumps(results["schemes"][-1]), file=sys.stderr, flush=True)
    if args.genai:
        results["peers"] = []
        for precision in ("int8", "int4"):
            results["peers"].append(run_genai(args.checkpoint, args.out, ckpt, precision, reference))
            print(json.dumps(results["peers"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
