"""Benchmark a session: TTFT, decode tokens/s, peak RSS, and the memory-bandwidth limit.

The batch-1 decode limit is bytes read per token / measured read bandwidth, where
bytes per token = the weights the session's graph reads for one token, at their stored size
(:mod:`.read_bytes`: int8 weights as int8, an embedding table one row, a tied table whole and
once) + the KV cache at the mean context length of the decode (prompt + new_tokens / 2).
Sessions without a graph (torch, TensorRT) count from the config at their dtype.

Bandwidth: the session's thread count each reducing its slice of one float32 buffer larger
than the last-level cache with ``np.max`` (a SIMD compare per element: the fastest streaming
read numpy has here, measured 2.2x ``.sum()``, which is compute-bound and was slower than ONNX
Runtime's own GEMV) (at least ``bandwidth_gib``, at least 4x the cache), warm (touched
and read once before timing: a first touch times page faults, not memory), best of a few.
That is the rate a decode that streams its weights from memory cannot beat, so
``fraction_of_limit`` <= 1 by construction of the measurement, whenever the weights read per
token do not fit in the cache (``weights_fit_in_cache`` says when they do: then the limit
is a memory limit the model never meets).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GenerationError
from .generate import GenerationConfig, generate_batch
from .sessions.base import Session, physical_cores


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
    bandwidth_threads: int | None = None
    bandwidth_buffer_mib: float | None = None
    weight_bytes_source: str = ""          # "graph" (initializers read) or "config" (estimate)
    weights_fit_in_cache: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB), from getrusage."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


MIN_BANDWIDTH_GIB = 1 / 1024
MAX_BENCH_BATCH = 4096  # a KV cache per sequence: far more only exhausts memory


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs); 32 MiB when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


@dataclass(frozen=True)
class Bandwidth:
    best_gb_s: float
    median_gb_s: float
    threads: int
    buffer_bytes: int


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int = 1) -> Bandwidth:
    """Read bandwidth (1e9 B/s) over one warm float32 buffer of max(``gib``, 4x the last-level
    cache) with ``threads`` threads: the faster of numpy (each thread reduces a slice with max;
    the GIL is released there) and ONNX Runtime's own GEMV streaming the buffer as a weight, plain and
    prepacked (MLAS loads faster than numpy's reduction on some CPUs), so a decode step, also a GEMV,
    cannot beat it."""
    threads = max(1, int(threads))
    nbytes = max(int(gib * (1 << 30)), 4 * last_level_cache_bytes())
    a = np.ones(nbytes // 4, dtype=np.float32)  # first touch here, outside the timing
    chunks = np.array_split(a, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, chunks))  # warm-up pass
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.max, chunks))
            rates.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    del chunks
    rates += _ort_gemv_rates(a, repeats, threads)
    del a
    return Bandwidth(max(rates), statistics.median(rates), threads, nbytes)


def _ort_gemv_rates(a: np.ndarray, repeats: int, threads: int) -> list[float]:
    """GB/s of ONNX Runtime's MatMul [1,k] x [k,n] over ``a`` as the weight, fed as an input, and
    over 4x the last-level cache of it as a constant, which ORT prepacks as it does a model's
    weights (its packed layout can stream a few percent faster: a limit must cover that too).
    [] without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        return []
    k = 1024
    w = a[: (a.size // k) * k].reshape(k, -1)
    n = max(1, min(w.shape[1], 4 * last_level_cache_bytes() // 4 // k))
    return _gemv_rates(w, repeats, threads, constant=False) + _gemv_rates(w[:, :n], repeats, threads, constant=True)


def _gemv_rates(w: np.ndarray, repeats: int, threads: int, *, constant: bool) -> list[float]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = w.shape[0]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])]
    if not constant:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(w), "w")] if constant else [])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # spinning workers, as the sessions it bounds run (no wake-up between runs); they stop with
    # the session, before anything else is timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((1, k), dtype=np.float32)}
    if not constant:
        feeds["w"] = w  # a graph input: no copy into the session
    sess.run(None, feeds)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        rates.append(w.nbytes / (time.perf_counter() - t) / 1e9)
    del sess
    return rates


def _config_weight_bytes(session: Session, bpp: int) -> int:
    c = session.config
    embed = c.vocab_size * c.hidden_size
    params = c.num_parameters()
    if c.tie_word_embeddings:  # the lm head reads the shared table whole
        return int((params + c.hidden_size) * bpp)
    return int((params - embed + c.hidden_size) * bpp)


def bytes_per_token(session: Session, context_len: int) -> tuple[int, int, str]:
    """(weight bytes, KV-cache bytes, how the weights were counted) read to decode one token of
    one sequence at ``context_len``: from the session's graph when it has one, else the config."""
    c = session.config
    kv_dtype = getattr(session, "kv_dtype", None)
    bpp = 2 if (kv_dtype is not None and np.dtype(kv_dtype).itemsize == 2) or \
        getattr(session, "dtype", "fp32") in ("fp16", "bf16") else 4
    reads = getattr(session, "graph_reads", None)
    counted = reads() if callable(reads) else None
    if counted is not None:
        weights, source = counted.weight_bytes_per_token, "graph"
    else:
        weights, source = _config_weight_bytes(session, bpp), "config"
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context_len
    return int(weights), int(kv * bpp), source


def _probe_in_child(gib: float, threads: int) -> Bandwidth:
    """:func:`measure_bandwidth` in a forked child (its own cores' time and its own RSS)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(measure_bandwidth, (gib,), {"threads": threads})


def _session_threads(session: Session) -> int:
    n = session.describe().get("intra_op_num_threads") or getattr(session, "threads", None)
    return int(n) if n else physical_cores()


def bench(session: Session, *, batch: int = 1, prompt_len: int = 64, new_tokens: int = 32, runs: int = 3,
          warmup: int = 1, seed: int = 0, bandwidth_gib: float | None = 0.25, artifact: str = "") -> BenchResult:
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
    # the probe first, in a child process: after a run the session's spinning worker threads hold
    # the cores (measured: 22 GB/s instead of 37 next to an ORT session that had just run), and the
    # probe's buffer must not count in this process's peak RSS
    probe = _probe_in_child(bandwidth_gib, _session_threads(session)) if bandwidth_gib else None
    ttft, rates = [], []
    for i in range(warmup + runs):
        res = generate_batch(session, prompts, cfg)[0]
        if i >= warmup:
            ttft.append(res.prefill_ms)
            rates.append(res.decode_tokens_per_s * batch)
    peak = peak_rss_mib()
    w_bytes, kv_bytes, source = bytes_per_token(session, prompt_len + new_tokens // 2)
    limit = frac = None
    if probe is not None:
        limit = probe.best_gb_s * 1e9 / (w_bytes + kv_bytes)
        frac = (statistics.median(rates) / batch) / limit
    return BenchResult(
        backend=session.backend, artifact=str(artifact), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        runs=runs, ttft_ms_median=statistics.median(ttft), decode_tokens_per_s_median=statistics.median(rates),
        ttft_ms=ttft, decode_tokens_per_s=rates, peak_rss_mib=peak, weight_bytes_per_token=w_bytes,
        kv_bytes_per_token=kv_bytes, bandwidth_gb_s=probe and probe.best_gb_s,
        bandwidth_gb_s_median=probe and probe.median_gb_s, limit_tokens_per_s=limit, fraction_of_limit=frac,
        session=session.describe(), bandwidth_threads=probe and probe.threads,
        bandwidth_buffer_mib=probe and probe.buffer_bytes / (1 << 20), weight_bytes_source=source,
        weights_fit_in_cache=w_bytes + kv_bytes <= last_level_cache_bytes(),
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
    t.add_row(f"bytes read / token (weights from the {r.weight_bytes_source or 'config'} + KV)",
              f"{(r.weight_bytes_per_token + r.kv_bytes_per_token) / 1e6:.2f} MB")
    if r.bandwidth_gb_s is not None:
        t.add_row(f"read bandwidth (best / median; {r.bandwidth_threads} threads, {r.bandwidth_buffer_mib:.0f} MiB)",
                  f"{r.bandwidth_gb_s:.1f} / {r.bandwidth_gb_s_median:.1f} GB/s")
        t.add_row("batch-1 decode limit", f"{r.limit_tokens_per_s:.0f} tok/s")
        t.add_row("fraction of limit (per sequence)", f"{100 * r.fraction_of_limit:.1f} %"
                  + (" (weights fit in the cache: not a memory-bound decode)" if r.weights_fit_in_cache else ""))
    tuned = ", ".join(f"{k}={v}" for k, v in r.session.items() if k not in ("backend", "onnx", "checkpoint"))
    Console().print(t)
    Console().print(f"[dim]{escape(tuned)}[/dim]")  # escaped: "['CPUExecutionProvider']" is not markup


__all__ = ["Bandwidth", "BenchResult", "bench", "bytes_per_token", "last_level_cache_bytes", "measure_bandwidth",
           "peak_rss_mib", "render_bench"]
