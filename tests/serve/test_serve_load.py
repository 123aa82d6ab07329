"""Bounded load on loopback: 200 requests, 16 concurrent, mixed streaming; no failures, no leaks."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "tiny"
REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "big", "red", "dog", "ran", "to", "house", "hello", "world"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _load(base_url: str, n: int, concurrency: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20)))
        max_tokens = rng.randint(1, 24)
        chat = i % 3 == 0
        stream = i % 2 == 0
        if chat:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        else:
            url, body = "/v1/completions", {"prompt": prompt}
        body |= {"model": MODEL, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]), "seed": i,
                 "stream": stream}
        async with sem:
            try:
                if stream:
                    n_chunks, done = 0, False
                    async with client.stream("POST", url, json=body) as r:
                        if r.status_code != 200:
                            failures.append(f"{i}: {r.status_code}")
                            return
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                json.loads(line[6:])
                                n_chunks += 1
                    if not done or n_chunks < 1:
                        failures.append(f"{i}: stream ended without [DONE]")
                else:
                    r = await client.post(url, json=body)
                    if r.status_code != 200:
                        failures.append(f"{i}: {r.status_code} {r.text[:200]}")
                        return
                    u = r.json()["usage"]
                    if not (1 <= u["completion_tokens"] <= max_tokens
                            and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]):
                        failures.append(f"{i}: bad usage {u}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{i}: {type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return failures


def test_load_200_requests_16_concurrent(server, engine):
    assert not asyncio.run(_load(server.base_url, 16, 8, seed=1))  # warm-up (allocations, arenas)
    gc.collect()
    time.sleep(0.3)
    tasks_before, rss_before = server.task_count(), _rss_mb()
    steps_before, rows_before = engine.stats.steps, engine.stats.rows_stepped
    t0 = time.perf_counter()
    failures = asyncio.run(asyncio.wait_for(_load(server.base_url, 200, 16, seed=2), timeout=120))
    elapsed = time.perf_counter() - t0
    assert not failures, failures[:10]
    # every connection closed: the server's task count goes back to what it was
    assert _wait(lambda: server.task_count() <= tasks_before), (server.task_count(), tasks_before)
    gc.collect()
    growth = _rss_mb() - rss_before
    assert growth < 150, f"RSS grew by {growth:.0f} MB"
    assert engine.active_count == 0 and engine.queue_depth == 0
    mean_batch = (engine.stats.rows_stepped - rows_before) / max(1, engine.stats.steps - steps_before)
    print(f"200 requests in {elapsed:.1f} s, mean rows per step {mean_batch:.2f}, RSS +{growth:.1f} MB")
    assert mean_batch > 1.5  # requests really shared decode steps


def _wait(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_bench_serve_prints_json(tiny_export):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--artifact", str(tiny_export),
                          "--requests", "24", "--concurrency", "4", "--max-tokens", "8", "--backend", "onnxruntime"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["failed"] == 0 and report["requests"] == 24
    for key in ("requests_per_s", "output_tokens_per_s", "latency_s", "ttft_s"):
        assert key in report
    assert set(report["latency_s"]) >= {"p50", "p90", "p99"}
