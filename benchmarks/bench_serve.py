"""Serving benchmark: start `llama-trt serve`'s app on loopback, fire N requests, print JSON.

    python benchmarks/bench_serve.py [--artifact EXPORT_DIR] [--requests 200] [--concurrency 16]
                                     [--max-tokens 32] [--max-batch 8] [--stream-ratio 0.5]

Without --artifact a tiny seeded model is created and exported into a temporary folder
(needs torch). Only loopback traffic; the request count is bounded. Prints one JSON object:
throughput (requests/s, output tokens/s), latency and time-to-first-token percentiles,
and the scheduler's mean rows per decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "serve"))

WORDS = ["the", "cat", "sat", "on", "mat", "a", "big", "red", "dog", "ran", "to", "house", "hello", "world"]


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return round(v[k], 5)


async def drive(base_url, model, n, concurrency, max_tokens, stream_ratio, seed):
    import httpx

    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    lat, ttft, tokens, failed = [], [], [0], [0]

    async def one(i, client):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 32)))
        stream = rng.random() < stream_ratio
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with sem:
            t0 = time.perf_counter()
            try:
                if stream:
                    first = None
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            failed[0] += 1
                            return
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                d = json.loads(line[6:])
                                if first is None and d.get("choices"):
                                    first = time.perf_counter()
                                if d.get("usage"):
                                    tokens[0] += d["usage"]["completion_tokens"]
                    ttft.append((first or time.perf_counter()) - t0)
                else:
                    r = await client.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        failed[0] += 1
                        return
                    tokens[0] += r.json()["usage"]["completion_tokens"]
                lat.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                failed[0] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    return wall, lat, ttft, tokens[0], failed[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--stream-ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.requests > 5000:
        ap.error("--requests is capped at 5000")

    from llama_trt.serve.app import create_app
    from llama_trt.serve.server import BackgroundServer as ServerThread
    from llama_trt.serve.server import build_engine
    from llama_trt.serve.settings import ServeSettings

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from serve_helpers import write_tokenizer

            from llama_trt.checkpoint import create_tiny_checkpoint
            from llama_trt.exporter import export

            ckpt = create_tiny_checkpoint(Path(tmp) / "ckpt", seed=0)
            write_tokenizer(ckpt)
            artifact = Path(tmp) / "tiny"
            export(ckpt, artifact)
        engine = build_engine(artifact, backend=args.backend, max_batch=args.max_batch,
                              max_queue=max(64, args.requests), model_name="bench")
        with ServerThread(create_app(engine, ServeSettings())) as srv:
            asyncio.run(drive(srv.base_url, "bench", min(8, args.requests), 4, 4, 0.5, 99))  # warm-up
            s0, r0 = engine.stats.steps, engine.stats.rows_stepped
            wall, lat, ttft, toks, failed = asyncio.run(
                drive(srv.base_url, "bench", args.requests, args.concurrency, args.max_tokens, args.stream_ratio,
                      args.seed))
            steps, rows = engine.stats.steps - s0, engine.stats.rows_stepped - r0
        engine.close()
    report = {
        "benchmark": "serve", "artifact": str(args.artifact or "tiny (generated)"), "backend": engine.info.get("backend"),
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "failed": failed, "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 2), "output_tokens_per_s": round(toks / wall, 1),
        "latency_s": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": pct(lat, 100)},
        "ttft_s": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "mean_rows_per_step": round(rows / max(1, steps), 2), "steps": steps,
    }
    print(json.dumps(report, indent=2))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
