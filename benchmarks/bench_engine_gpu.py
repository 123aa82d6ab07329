"""Decode tokens/s and time-to-first-token of a TensorRT / TensorRT-RTX engine on a GPU.

usage: python benchmarks/bench_engine_gpu.py ENGINE_DIR [--batch 1] [--prompt 128] [--new 128] [--repeats 5]

Prints one JSON object. Exits 2 with a one-line reason when no engine can run here (no GPU,
TensorRT not installed, a TensorRT-RTX engine on sm_90, ...): the compatibility check runs
before anything is deserialized. Does not import torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=128, help="decode steps")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    from llama_trt.errors import LlamaTrtError
    from llama_trt.runtime.sessions.tensorrt_session import TensorRTSession

    try:
        session = TensorRTSession(a.engine_dir)
    except LlamaTrtError as e:
        print(f"bench_engine_gpu: cannot run the engine here: {e}", file=sys.stderr)
        return 2
    cfg = session.config
    limits = session.manifest.shape_limits
    prompt = min(a.prompt, limits.max_seq)
    new = min(a.new, limits.max_context - prompt)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (a.batch, prompt))
    ttft, decode_tps = [], []
    for r in range(a.repeats + 1):  # first round warms up (JIT kernels on TensorRT-RTX)
        session.reset(a.batch, prompt + new)
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        logits = session.prefill(ids, mask, np.cumsum(mask, -1) - 1)
        nxt = logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new):
            mask = np.ones((a.batch, mask.shape[1] + 1), dtype=np.int64)
            logits = session.step(nxt, mask, np.full((a.batch, 1), mask.shape[1] - 1))
            nxt = logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        if r:
            ttft.append(t1 - t0)
            decode_tps.append(a.batch * new / (t2 - t1) if new else 0.0)
    print(json.dumps({
        "engine": session.describe(), "batch": a.batch, "prompt_tokens": prompt, "new_tokens": new,
        "repeats": a.repeats, "ttft_s_median": statistics.median(ttft),
        "decode_tokens_per_s_median": statistics.median(decode_tps),
        "ttft_s": ttft, "decode_tokens_per_s": decode_tps,
    }, indent=2))
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
