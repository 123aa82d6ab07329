#!/usr/bin/env python
"""Bounded soak of `llama-trt serve` on loopback (issue 16); prints one JSON object.

    python benchmarks/soak_serve.py [--artifact EXPORT_DIR] [--requests 1000] [--concurrency 32]

Starts the real server (``python -m llama_trt.cli serve``, a process of its own, so its RSS is
its own) on a tiny export (made in a temporary folder without --artifact), then sends a seeded
mix of requests at the given concurrency:

- ``valid``: completions and chat, JSON answers;      - ``stream``: SSE, read to ``[DONE]``;
- ``seeded``: sampling with a seed (repeats of one prompt+seed must give the same text);
- ``invalid``: wrong types, seed -1, lone surrogates, deep nesting, bad JSON, text/plain,
  unknown model, a body over the limit, a prompt over the context: each must be a 4xx;
- ``disconnect``: a stream dropped after its first event, or a request abandoned after 50 ms.

Counts hangs (no answer within --hang-s), 5xx answers, valid requests left unanswered, seed
mismatches, and the server's RSS growth from after a warm-up to the end; then SIGTERM and the
exit status. Exit 0 when hangs = 5xx = unanswered = 0, RSS growth < --max-rss-growth-mb and the
server exited cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "serve"))

MODEL = "tiny"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "big", "red", "dog", "ran", "to", "house", "hello", "world"]
KINDS = {"valid": 0.30, "stream": 0.20, "seeded": 0.15, "invalid": 0.25, "disconnect": 0.10}
JSON_CT = {"content-type": "application/json"}


def invalid_requests(max_body: int) -> list[tuple[str, dict, bytes]]:
    """(name, headers, raw body) for /v1/completions; every one must get a 4xx."""
    ok = {"model": MODEL, "prompt": "hello", "max_tokens": 2}

    def enc(body):
        return json.dumps(body).encode()

    return [
        ("seed-1", JSON_CT, enc({**ok, "seed": -1})),
        ("type", JSON_CT, enc({**ok, "temperature": "hot"})),
        ("range", JSON_CT, enc({**ok, "max_tokens": 0})),
        ("surrogate", JSON_CT, b'{"model": "tiny", "prompt": "ab\\ud800cd"}'),
        ("surrogate-key", JSON_CT, b'{"model": "tiny", "prompt": "a", "x\\udc80": "\\ud800"}'),
        ("nested", JSON_CT, b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("bad-json", JSON_CT, b'{"model": "tiny", "prompt": '),
        ("text-plain", {"content-type": "text/plain"}, enc(ok)),
        ("unknown-model", JSON_CT, enc({**ok, "model": "nope"})),
        ("too-big", JSON_CT, enc({**ok, "prompt": "a " * (max_body // 2 + 10)})),
        ("over-context", JSON_CT, enc({**ok, "prompt": "cat " * 400})),
        ("n2", JSON_CT, enc({**ok, "n": 2})),
    ]


class Soak:
    def __init__(self, base_url: str, args, rng: random.Random) -> None:
        self.base_url, self.args, self.rng = base_url, args, rng
        self.counts: Counter = Counter()
        self.statuses: Counter = Counter()
        self.detail: Counter = Counter()
        self.problems: list[str] = []
        self.seeded_texts: dict[tuple, set] = {}
        self.invalid = invalid_requests(args.max_body_bytes)

    def _prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(2, 16)))

    def _problem(self, kind: str, what: str) -> None:
        self.counts[f"{kind}_{what}"] += 1
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {what}")

    async def _json_request(self, client, kind: str, url: str, body: dict) -> str | None:
        r = await client.post(url, json=body)
        self.statuses[r.status_code] += 1
        if r.status_code >= 500:
            self._problem(kind, "5xx")
        if r.status_code != 200:
            self._problem(kind, "unanswered")
            return None
        choice = r.json()["choices"][0]
        return choice.get("text", (choice.get("message") or {}).get("content"))

    async def _stream(self, client, kind: str, body: dict, drop_after_first: bool) -> None:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            self.statuses[r.status_code] += 1
            if r.status_code != 200:
                self._problem(kind, "5xx" if r.status_code >= 500 else "unanswered")
                return
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if drop_after_first:
                        return  # leaving the block closes the connection mid-stream
            if not events or events[-1] != "data: [DONE]" or any('"error"' in e for e in events[:-1]):
                self._problem(kind, "unanswered")

    async def _invalid(self, client) -> None:
        name, headers, raw = self.rng.choice(self.invalid)
        r = await client.post("/v1/completions", content=raw, headers=headers)
        self.statuses[r.status_code] += 1
        if not 400 <= r.status_code < 500:
            self._problem("invalid", "5xx" if r.status_code >= 500 else f"not-4xx:{name}:{r.status_code}")

    async def _disconnect(self, client, body: dict) -> None:
        import httpx

        if sum(self.detail.values()) % 2 == 0:  # alternate the two ways of leaving
            self.detail["disconnect_mid_stream"] += 1
            await self._stream(client, "disconnect", {**body, "max_tokens": 40, "ignore_eos": True}, True)
            return
        self.detail["disconnect_abandoned"] += 1
        try:
            await client.post("/v1/completions", json={**body, "max_tokens": 40, "ignore_eos": True},
                              timeout=httpx.Timeout(60, read=0.05))
        except httpx.TimeoutException:
            pass  # abandoned, as intended

    async def one(self, client, kind: str) -> None:
        body = {"model": MODEL, "prompt": self._prompt(), "max_tokens": self.rng.randint(1, 16), "temperature": 0}
        if kind == "valid":
            if self.rng.random() < 0.5:
                chat = {"model": MODEL, "messages": [{"role": "user", "content": body["prompt"]}],
                        "max_tokens": body["max_tokens"]}
                await self._json_request(client, kind, "/v1/chat/completions", chat)
            else:
                await self._json_request(client, kind, "/v1/completions", body)
        elif kind == "stream":
            await self._stream(client, kind, body, False)
        elif kind == "seeded":
            key = (self.rng.choice(WORDS[:3]), self.rng.randint(0, 3))
            body |= {"prompt": key[0], "seed": key[1], "temperature": 0.9, "max_tokens": 8}
            text = await self._json_request(client, kind, "/v1/completions", body)
            if text is not None:
                self.seeded_texts.setdefault(key, set()).add(text)
        elif kind == "invalid":
            await self._invalid(client)
        else:
            await self._disconnect(client, body)

    async def run(self, n: int, concurrency: int) -> None:
        import httpx

        sem = asyncio.Semaphore(concurrency)
        kinds = self.rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)

        async def guarded(kind: str, client) -> None:
            async with sem:
                self.counts[kind] += 1
                t0 = time.perf_counter()
                try:
                    await asyncio.wait_for(self.one(client, kind), self.args.hang_s)
                except asyncio.TimeoutError:
                    self._problem(kind, "hang")
                except Exception as e:  # noqa: BLE001 - a transport error is a finding, not a crash
                    self._problem(kind, f"error:{type(e).__name__}")
                    self.problems.append(f"  {e!r} (cause {e.__cause__!r}) after {time.perf_counter() - t0:.3f} s")

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.args.hang_s, limits=limits) as client:
            await asyncio.gather(*(guarded(k, client) for k in kinds))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_export(folder: Path) -> Path:
    from serve_helpers import write_tokenizer

    from llama_trt.checkpoint import create_tiny_checkpoint
    from llama_trt.exporter import export

    ckpt = create_tiny_checkpoint(folder / "ckpt", seed=0)
    write_tokenizer(ckpt)
    export(ckpt, folder / MODEL)
    return folder / MODEL


def start_server(artifact: Path, port: int, args) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "llama_trt.cli", "serve", str(artifact), "--port", str(port), "--backend",
           "onnxruntime", "--model-name", MODEL, "--max-queue", str(max(64, args.concurrency * 4)),
           "--max-body-bytes", str(args.max_body_bytes), "--shutdown-timeout", "5", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited at start: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> dict:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    return {"exit_code": rc, "seconds": round(time.perf_counter() - t0, 2)}


def soak(artifact: Path, args) -> dict:
    port = free_port()
    proc = start_server(artifact, port, args)
    try:
        warm = Soak(f"http://127.0.0.1:{port}", args, random.Random(args.seed + 1))
        asyncio.run(warm.run(min(50, args.requests), min(8, args.concurrency)))
        rss_start = rss_mb(proc.pid)
        main = Soak(f"http://127.0.0.1:{port}", args, random.Random(args.seed))
        t0 = time.perf_counter()
        asyncio.run(main.run(args.requests, args.concurrency))
        wall = time.perf_counter() - t0
        time.sleep(0.5)  # let abandoned requests finish being cancelled
        rss_end = rss_mb(proc.pid)
    finally:
        shutdown = stop_server(proc)
    c = main.counts
    problems = {what: sum(v for k, v in c.items() if k.endswith(f"_{what}")) for what in ("hang", "5xx", "unanswered")}
    return {
        "benchmark": "soak_serve", "requests": args.requests, "concurrency": args.concurrency,
        "by_kind": {k: c[k] for k in KINDS}, "disconnects": dict(main.detail), "statuses": {str(k): v for k, v in sorted(main.statuses.items())},
        "hangs": problems["hang"], "server_errors_5xx": problems["5xx"], "unanswered_valid": problems["unanswered"],
        "other_findings": {k: v for k, v in c.items() if "_" in k and not k.endswith(("_hang", "_5xx", "_unanswered"))},
        "seed_mismatches": sum(1 for texts in main.seeded_texts.values() if len(texts) > 1),
        "seeded_keys": len(main.seeded_texts), "problems": main.problems, "wall_s": round(wall, 2),
        "rss_mb": {"after_warmup": round(rss_start, 1), "end": round(rss_end, 1),
                   "growth": round(rss_end - rss_start, 1)},
        "shutdown": shutdown,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="an export folder with a tokenizer (default: a tiny one)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--hang-s", type=float, default=60.0, help="no answer after this long = a hang")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 20000:
        ap.error("--requests must be in 1..20000 (the soak is bounded)")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        artifact = args.artifact or make_tiny_export(Path(tmp))
        report = soak(artifact, args)
    report["artifact"] = str(args.artifact or "tiny (generated)")
    report["ok"] = (report["hangs"] == 0 and report["server_errors_5xx"] == 0 and report["unanswered_valid"] == 0
                    and not report["other_findings"] and report["rss_mb"]["growth"] < args.max_rss_growth_mb
                    and report["shutdown"]["exit_code"] == 0)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
