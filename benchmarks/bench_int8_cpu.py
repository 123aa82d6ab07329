"""INT8 on CPU with ONNX Runtime: model size and batch-1 decode tokens/s, fp32 vs int8-weight vs int8-sq.

Model: a random ~100M-parameter-class LLaMA (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000, untied head) written with ``save_hf_checkpoint`` +
``random_state_dict``. Random weights: the speed and size figures are meaningful, the
accuracy of a random model is not (see tests/exporter/test_quantize.py for accuracy).

Exports fp32 once, then quantizes that export twice (``quantize_folder``): int8-weight
(defaults: lm head quantized) and int8-sq (built-in calibration, few samples). Decode:
prefill PROMPT tokens, then STEPS single-token steps with the KV cache, contenders
alternated ROUNDS times; the median tokens/s per contender is reported. ONNX Runtime
session defaults (graph optimisation ALL) plus one extra int8-weight run with
``session.qdq_matmulnbits_accuracy_level=1`` (fp32 compute in the fused MatMulNBits).
Prints one JSON object.

    python benchmarks/bench_int8_cpu.py [--work DIR] [--steps 32] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_checkpoint(folder: Path) -> Path:
    from llama_trt.checkpoint import random_state_dict, save_hf_checkpoint
    from llama_trt.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                      num_kv_heads=4, max_position_embeddings=2048)
    if not (folder / "config.json").is_file():
        save_hf_checkpoint(cfg, random_state_dict(cfg, seed=0), folder, overwrite=True)
    return folder


def session(path: Path, threads: int, accuracy_level: int | None = None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    if accuracy_level is not None:
        o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path / "model.onnx"), o, providers=["CPUExecutionProvider"])


def decode_tps(sess, manifest, prompt: int, steps: int) -> float:
    from llama_trt.exporter.feeds import build_feeds, split_outputs

    ids = (np.arange(prompt, dtype=np.int64) % 1000 + 10)[None]
    logits, past = split_outputs(manifest, sess.run(None, build_feeds(manifest, ids)))
    total = prompt
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        total += 1
        logits, past = split_outputs(manifest, sess.run(None, build_feeds(manifest, nxt, np.ones((1, total), np.int64), past=past)))
    return steps / (time.perf_counter() - t0)


def fused_ops(path: Path, threads: int, accuracy_level=None) -> dict:
    """Op histogram of ONNX Runtime's optimised graph (what the Q/DQ MatMuls became)."""
    import collections

    import onnx
    import onnxruntime as ort

    out = path / "ort_optimized.onnx"
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.optimized_model_filepath = str(out)
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if accuracy_level is not None:
        o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    ort.InferenceSession(str(path / "model.onnx"), o, providers=["CPUExecutionProvider"])
    m = onnx.load(str(out), load_external_data=False)
    c = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    out.unlink(missing_ok=True)
    for f in path.glob("ort_optimized.onnx*"):
        f.unlink()
    keys = ("MatMul", "com.microsoft.MatMulNBits", "MatMulInteger", "com.microsoft.MatMulIntegerToFloat",
            "QLinearMatMul", "com.microsoft.DynamicQuantizeMatMul", "DequantizeLinear", "QuantizeLinear")
    return {k: c[k] for k in keys if c.get(k)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=4)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-int8-"))
    work.mkdir(parents=True, exist_ok=True)

    from llama_trt.exporter import export, load_manifest
    from llama_trt.exporter.quantize import parse_options, quantize_folder

    timings = {}
    t = time.perf_counter()
    ckpt = make_checkpoint(work / "ckpt")
    timings["checkpoint_s"] = time.perf_counter() - t
    dirs = {"fp32": work / "fp32", "int8-weight": work / "int8-weight", "int8-sq": work / "int8-sq"}
    if not (dirs["fp32"] / "manifest.json").is_file():
        t = time.perf_counter()
        export(ckpt, dirs["fp32"], force=True, ort_check=False)
        timings["export_fp32_s"] = time.perf_counter() - t
    for scheme in ("int8-weight", "int8-sq"):
        if not (dirs[scheme] / "manifest.json").is_file():
            dirs[scheme].mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            quantize_folder(dirs["fp32"], dirs[scheme], parse_options(scheme, calib_samples=args.calib_samples,
                                                                    calib_seq_len=32), ort_check=False)
            timings[f"quantize_{scheme}_s"] = time.perf_counter() - t

    contenders = {"fp32": (dirs["fp32"], None), "int8-weight": (dirs["int8-weight"], None),
                  "int8-weight(acc_level=1)": (dirs["int8-weight"], 1), "int8-sq": (dirs["int8-sq"], None)}
    manifests = {k: load_manifest(d) for k, (d, _) in contenders.items()}
    sessions = {k: session(d, args.threads, lvl) for k, (d, lvl) in contenders.items()}
    for k in contenders:  # warm-up
        decode_tps(sessions[k], manifests[k], args.prompt, 2)
    runs = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for k in contenders:
            runs[k].append(decode_tps(sessions[k], manifests[k], args.prompt, args.steps))
    result = {
        "benchmark": "int8_cpu_onnxruntime",
        "machine": f"{platform.machine()}, {args.threads} threads",
        "model": "random LLaMA hidden 768, 12 layers, 12 heads, 4 kv heads, intermediate 2048, vocab 32000 (untied)",
        "params": None,
        "prompt_tokens": args.prompt, "decode_steps": args.steps, "rounds": args.rounds,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "contenders": {},
    }
    from llama_trt.config import LlamaConfig

    cfg = LlamaConfig.from_dict(manifests["fp32"].config)
    result["params"] = cfg.num_parameters()
    for k, (d, lvl) in contenders.items():
        result["contenders"][k] = {
            "model_mib": round(manifests[k].model_bytes / 2**20, 1),
            "decode_tok_s_median": round(statistics.median(runs[k]), 2),
            "decode_tok_s_runs": [round(r, 2) for r in runs[k]],
            "ort_optimized_ops": fused_ops(d, args.threads, lvl),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
