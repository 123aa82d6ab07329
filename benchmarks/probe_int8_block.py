"""Probe: ONNX Runtime's int8 kernel block size against accuracy, for a per-channel int8-weight export.

    python benchmarks/probe_int8_block.py EXPORT_DIR [--block 64] [--cycles 8] [--threads 2]

ORT fuses a per-channel int8 ``DequantizeLinear -> MatMul`` into an 8-bit ``MatMulNBits`` with
blocks of 32 along K, and at accuracy level 4 it rounds the activations to int8 in blocks of the
same size. The weights are per channel, so the same values can be written as blocks of 64 (the
channel's scale repeated): half the scales to read and half the activation blocks, at a coarser
activation rounding. This probe opens the export twice in one process, as the session builds it
and with every per-channel int8 DQ whose K the block divides rewritten that way (in a private
graph cache: the export and the user's cache are not touched), alternates batch-1 generation
(64 + 32 tokens), and certifies both with validate's teacher-forced certificate. Prints JSON.

Superseded (2026-12-06): the block is now the export's (``--int8-kernel-block``, chosen by the
certificate: quantize/kernel_block.py). Its speed figure is biased: both sessions live in one process
and each keeps a spinning worker thread (+13% here; +3-7% with each session in its own process,
bench_runtime_cpu.py's ``ours_int8_weight`` vs ``ours_int8_weight_block32``). Kept for the record of
benchmarks/RESULTS.md's 2026-12-03 entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def blocked_rewrite(block: int):
    """A drop-in for ort_pack.drop_zero_int8_zero_points that also rewrites per-channel DQs."""
    from onnx import helper, numpy_helper

    from llama_trt.runtime.sessions import ort_lowering

    original = ort_lowering.drop_zero_int8_zero_points

    def rewrite(model, weights_dir):
        done = original(model, weights_dir)
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type != "DequantizeLinear" or any(a.name == "block_size" for a in n.attribute) or len(n.input) != 2:
                continue
            q, s = inits.get(n.input[0]), inits.get(n.input[1])
            if q is None or s is None or q.data_type != 3 or len(q.dims) != 2 or len(s.dims) != 1:
                continue
            k = int(q.dims[0])
            if k % block or s.data_location == s.EXTERNAL:
                continue
            name = f"{n.input[1]}.block{block}"
            scale = numpy_helper.to_array(s).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(np.repeat(scale[None, :], k // block, 0), name))
            n.input[1] = name
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        return done

    return ort_lowering, original, rewrite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama_trt.checkpoint import load_checkpoint
    from llama_trt.exporter import load_manifest
    from llama_trt.runtime import GenerationConfig, generate_batch, open_session
    from llama_trt.runtime.sessions import ort_cache
    from llama_trt.validate.reference import reference_for
    from llama_trt.validate.teacher_forced import certify

    ckpt = load_checkpoint(load_manifest(args.export).source_checkpoint)
    reference = reference_for(ckpt, None)
    lowering, original, rewrite = blocked_rewrite(args.block)
    private = Path(tempfile.mkdtemp(prefix="probe-int8-block-"))
    default_cache = ort_cache.default_cache_dir
    out = {"probe": "int8 kernel block", "export": str(args.export), "block": args.block, "threads": args.threads}
    sessions, certs = {}, {}
    for name, patched in (("block 32 (as the session builds it)", False), (f"block {args.block}", True)):
        lowering.drop_zero_int8_zero_points = rewrite if patched else original
        ort_cache.default_cache_dir = (lambda: private) if patched else default_cache
        try:
            certs[name] = certify(args.export, ckpt, reference=reference, threads=args.threads)
            sessions[name] = open_session(args.export, "onnxruntime", threads=args.threads,
                                          cache_dir=private if patched else None)
        finally:
            lowering.drop_zero_int8_zero_points = original
            ort_cache.default_cache_dir = default_cache
    prompt = [list(np.random.default_rng(0).integers(100, min(40000, ckpt.config.vocab_size), 64))]
    speed = {n: [] for n in sessions}
    names = list(sessions)
    for c in range(args.cycles):
        for n in names if c % 2 == 0 else names[::-1]:
            r = generate_batch(sessions[n], prompt, GenerationConfig(max_new_tokens=32, ignore_eos=True))[0]
            speed[n].append(r.decode_tokens_per_s)
    out["results"] = {n: {"decode_tokens_per_s_median": float(np.median(speed[n])),
                          "decode_tokens_per_s": [round(x, 2) for x in speed[n]],
                          "kl": certs[n].kl, "top1": certs[n].top1, "kl_p99": certs[n].kl_p99,
                          "certificate_passed": certs[n].passed} for n in names}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
