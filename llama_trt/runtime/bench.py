"""Benchmark a session: TTFT, decode tokens/s, peak RSS, and the memory-bandwidth limit.

The batch-1 decode limit is bytes read per token / measured read bandwidth, where
bytes per token = every weight except the embedding table (one row of it is read per
token; a tied table is read whole by the lm head) + the KV cache at the mean context
length of the decode (prompt + new_tokens / 2). Bandwidth: ``.sum()`` over a warm
float32 array (1 GiB by default) after a warm-up pass; best of a few (first-touch
copies would time page faults, not memory).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import GenerationError
from .generate import GenerationConfig, generate_batch
from .sessions.base import Session


@dataclass
class BenchResult:
    backend: str
    artifact: str
    batch: int
    prompt_len: int
    new_tokens: int
    runs: int
    ttft_ms_median: float
    decode_tokens_per_s_median: float     # all sequences together (batch * steps / s)
    ttft_ms: list[float]
    decode_tokens_per_s: list[float]
    peak_rss_mib: float
    weight_bytes_per_token: int
    kv_bytes_per_token: int
    bandwidth_gb_s: float | None           # best read bandwidth (1e9 B/s)
    bandwidth_gb_s_median: float | None
    limit_tokens_per_s: float | None       # batch-1 decode limit from bandwidth
    fraction_of_limit: float | None        # measured batch-1 (per-sequence) rate / limit
    session: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB), from getrusage."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


MIN_BANDWIDTH_GIB = 1 / 1024
MAX_BENCH_BATCH = 4096  # a KV cache per sequence: far more only exhausts memory


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """(best, median) read bandwidth in GB/s from ``.sum()`` over a warm float32 array."""
    n = int(gib * (1 << 30)) // 4
    a = np.ones(n, dtype=np.float32)  # first touch here, outside the timing
    a.sum()  # warm-up pass
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        rates.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    del a
    return max(rates), statistics.median(rates)


def bytes_per_token(session: Session, context_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) read to decode one token of one sequence at ``context_len``."""
    c = session.config
    kv_dtype = getattr(session, "kv_dtype", None)
    bpp = 2 if (kv_dtype is not None and np.dtype(kv_dtype).itemsize == 2) or \
        getattr(session, "dtype", "fp32") in ("fp16", "bf16") else 4
    embed = c.vocab_size * c.hidden_size
    params = c.num_parameters()
    if c.tie_word_embeddings:  # the lm head reads the shared table whole
        weights = params + c.hidden_size
    else:
        weights = params - embed + c.hidden_size
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context_len
    return int(weights * bpp), int(kv * bpp)


def bench(session: Session, *, batch: int = 1, prompt_len: int = 64, new_tokens: int = 32, runs: int = 3,
          warmup: int = 1, seed: int = 0, bandwidth_gib: float | None = 1.0, artifact: str = "") -> BenchResult:
    """Warm up, then ``runs`` greedy generations of ``new_tokens`` from random prompts of ``prompt_len``."""
    if batch < 1 or prompt_len < 1 or new_tokens < 2 or runs < 1:
        raise GenerationError("bench needs batch >= 1, prompt-len >= 1, new-tokens >= 2 and runs >= 1")
    if bandwidth_gib and bandwidth_gib < MIN_BANDWIDTH_GIB:  # a few bytes time nothing (and divided by zero)
        raise GenerationError(f"--bandwidth-gib must be 0 (skip) or at least {MIN_BANDWIDTH_GIB:g} (1 MiB), "
                              f"got {bandwidth_gib:g}")
    if prompt_len + new_tokens > session.max_context:  # before any allocation sized by them
        raise GenerationError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the context of "
                              f"{session.max_context}; lower them")
    if batch > MAX_BENCH_BATCH:
        raise GenerationError(f"--batch must be <= {MAX_BENCH_BATCH}, got {batch}")
    rng = np.random.default_rng(seed)
    c = session.config
    prompts = rng.integers(3, c.vocab_size, size=(batch, prompt_len)).tolist()
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    ttft, rates = [], []
    for i in range(warmup + runs):
        res = generate_batch(session, prompts, cfg)[0]
        if i >= warmup:
            ttft.append(res.prefill_ms)
            rates.append(res.decode_tokens_per_s * batch)
    peak = peak_rss_mib()  # before the bandwidth array inflates it
    w_bytes, kv_bytes = bytes_per_token(session, prompt_len + new_tokens // 2)
    bw = bw_med = limit = frac = None
    if bandwidth_gib:
        bw, bw_med = measure_bandwidth(bandwidth_gib)
        limit = bw * 1e9 / (w_bytes + kv_bytes)
        frac = (statistics.median(rates) / batch) / limit
    return BenchResult(
        backend=session.backend, artifact=str(artifact), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        runs=runs, ttft_ms_median=statistics.median(ttft), decode_tokens_per_s_median=statistics.median(rates),
        ttft_ms=ttft, decode_tokens_per_s=rates, peak_rss_mib=peak, weight_bytes_per_token=w_bytes,
        kv_bytes_per_token=kv_bytes, bandwidth_gb_s=bw, bandwidth_gb_s_median=bw_med, limit_tokens_per_s=limit,
        fraction_of_limit=frac, session=session.describe(),
    )


def render_bench(result: BenchResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    r = result
    t = Table(title=f"llama-trt bench: {r.backend} · batch {r.batch} · prompt {r.prompt_len} · "
                    f"{r.new_tokens} new tokens · {r.runs} runs")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("TTFT (median)", f"{r.ttft_ms_median:.1f} ms")
    t.add_row("decode (median, all sequences)", f"{r.decode_tokens_per_s_median:.1f} tok/s")
    t.add_row("decode per sequence", f"{r.decode_tokens_per_s_median / r.batch:.1f} tok/s")
    t.add_row("peak RSS", f"{r.peak_rss_mib:.0f} MiB")
    t.add_row("bytes read / token (weights + KV)",
              f"{(r.weight_bytes_per_token + r.kv_bytes_per_token) / 1e6:.2f} MB")
    if r.bandwidth_gb_s is not None:
        t.add_row("read bandwidth (best / median)", f"{r.bandwidth_gb_s:.1f} / {r.bandwidth_gb_s_median:.1f} GB/s")
        t.add_row("batch-1 decode limit", f"{r.limit_tokens_per_s:.0f} tok/s")
        t.add_row("fraction of limit (per sequence)", f"{100 * r.fraction_of_limit:.1f} %")
    tuned = ", ".join(f"{k}={v}" for k, v in r.session.items() if k not in ("backend", "onnx", "checkpoint"))
    Console().print(t)
    Console().print(f"[dim]{escape(tuned)}[/dim]")  # escaped: "['CPUExecutionProvider']" is not markup


__all__ = ["BenchResult", "bench", "bytes_per_token", "measure_bandwidth", "peak_rss_mib", "render_bench"]
