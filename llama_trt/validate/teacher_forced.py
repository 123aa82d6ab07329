"""Teacher-forced accuracy over real text: the metrics behind the :class:`AccuracyCertificate`.

The text is tokenized with the model's tokenizer (the artifact's, else the checkpoint's),
cut into windows of at most ``window`` tokens (BOS first when the tokenizer adds one; windows
never exceed the artifact's context), and each window is prefilled once on both sides: the
fp32 torch model and the artifact on its backend (ONNX Runtime CPU through the same session
``run`` uses, so its fused-kernel rewrite is what gets certified; or TensorRT). Windows of
equal length are batched. Every position that predicts a next token is scored: KL(p_ref ||
p_art), same argmax, and the next token's NLL under each model (perplexity).

A checkpoint without a tokenizer (tiny seeded test models) is scored on a seeded sample of
the reference model instead; the certificate's ``text_source`` says so.

Entry point for other stages (quantization, benchmarks): :func:`certify`.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ValidationError
from . import metrics as M
from .certificate import AccuracyCertificate
from .corpus import EvalText, load_eval_text
from .tolerances import METRICS, Tolerances, default_tolerances

DEFAULT_WINDOW = 512
DEFAULT_BATCH = 2
SAMPLED_TOKENS = 256            # no-tokenizer fallback: a reference sample this long

LogitsFn = Callable[[np.ndarray], np.ndarray]   # ids [batch, seq] int64 -> logits [batch, seq, vocab]


@dataclass(frozen=True)
class EvalTokens:
    windows: tuple[tuple[int, ...], ...]
    source: str
    sha256: str

    @property
    def scored(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def split_windows(ids: list[int], window: int, prefix: list[int]) -> list[list[int]]:
    """``prefix`` + consecutive chunks of ``ids``, each at most ``window`` long; the last chunk
    joins the previous one's when it would score fewer than 16 tokens alone (and fits)."""
    body = window - len(prefix)
    if body < 2:
        raise ValidationError(f"window of {window} tokens is too short for teacher forcing")
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)]
    if len(chunks) > 1 and len(chunks[-1]) < 16:
        chunks = chunks[:-1]  # too short to say anything; the rest is plenty
    return [prefix + c for c in chunks if len(prefix) + len(c) >= 2]


def text_tokens(text: EvalText, tokenizer, window: int, vocab_size: int) -> EvalTokens:
    if tokenizer.vocab_size > vocab_size:
        raise ValidationError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{vocab_size}: it belongs to another model")
    body = tokenizer.encode(text.text, add_bos=False)
    with_bos = tokenizer.encode("a", add_bos=True)
    prefix = with_bos[: len(with_bos) - len(tokenizer.encode("a", add_bos=False))]
    wins = split_windows(body, window, prefix)
    if not wins:
        raise ValidationError(f"the evaluation text ({text.source}) has too few tokens to score")
    return EvalTokens(tuple(tuple(w) for w in wins), text.source, text.sha256)


def sampled_tokens(reference, window: int, seed: int = 1) -> EvalTokens:
    """A seeded sample of the reference (a :class:`~.reference.TorchReference`, temperature 1):
    for checkpoints without a tokenizer."""
    import hashlib

    cfg = reference.config
    n = min(SAMPLED_TOKENS, window)
    wins = [reference.sample_tokens(n, seed=seed + k, bos=cfg.bos_token_id) for k in range(max(1, SAMPLED_TOKENS // n))]
    digest = hashlib.sha256(np.asarray(wins, dtype="<i8").tobytes()).hexdigest()
    return EvalTokens(tuple(tuple(w) for w in wins), f"sampled-from-reference:seed={seed}:T=1 (no tokenizer)", digest)


def torch_logits_fn(model) -> LogitsFn:
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        return logits.float().numpy()

    return run


def session_logits_fn(session) -> LogitsFn:
    """Prefill through a runtime :class:`~llama_trt.runtime.sessions.Session` (ORT / TensorRT)."""

    def run(ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        session.reset(b, t)
        mask = np.ones((b, t), np.int64)
        pos = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t))
        return np.asarray(session.prefill(ids, mask, pos), dtype=np.float32)

    return run


def teacher_forced(reference: LogitsFn, candidate: LogitsFn, windows, batch: int = DEFAULT_BATCH,
                   on_progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run every window through both sides (equal-length windows batched) and summarize."""
    parts: dict[str, list[np.ndarray]] = {"kl": [], "top1": [], "nll_ref": [], "nll_cand": []}
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch):
            ids = np.asarray(group[i : i + batch], dtype=np.int64)
            ref, cand = reference(ids), candidate(ids)
            for row in range(ids.shape[0]):
                per = M.position_metrics(ref[row, :-1], cand[row, :-1], ids[row, 1:])
                for k, v in per.items():
                    parts[k].append(v)
            if on_progress is not None:
                on_progress(int(ids.shape[0] * (ids.shape[1] - 1)))
    return M.summarize_positions(*(np.concatenate(parts[k]) for k in ("kl", "top1", "nll_ref", "nll_cand")))


def gate_failures(values: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    failures = []
    for name in ("kl", "kl_p99", "top1", "ppl_ratio"):
        thr = thresholds.get(name)
        if thr is None:
            continue
        op, desc = METRICS[name]
        value = values[name]
        ok = (value >= thr) if op == ">=" else (value <= thr)
        if not ok or np.isnan(value):
            failures.append(f"metric {name}: {value:.6g} fails {op} {thr:g} ({desc})")
    return failures


def scheme_of(manifest: dict) -> str:
    """"fp32" / "fp16" or the quantization scheme name the manifest records ("int8-weight", ...)."""
    q = manifest.get("quantization")
    if isinstance(q, dict):
        for key in ("scheme", "name"):
            s = q.get(key)
            if isinstance(s, dict):
                s = s.get("name") or s.get("scheme")
            if isinstance(s, str) and s:
                return s
    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    inner = src.get("manifest") if isinstance(src.get("manifest"), dict) else None
    if inner is not None and inner.get("quantization"):  # engine built from a quantized export
        return scheme_of(inner)
    return str(manifest.get("dtype") or manifest.get("precision") or "fp32")


def _tokens_for(artifact_dir: Path, checkpoint_path, reference, eval_text, window: int) -> EvalTokens:
    from ..runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(artifact_dir) if artifact_dir.is_dir() else None
    if tok is None and checkpoint_path is not None and Path(checkpoint_path).is_dir():
        tok = load_tokenizer(Path(checkpoint_path))
    if tok is None:
        if eval_text is not None:
            raise ValidationError("--eval-text needs a tokenizer (tokenizer.json / tokenizer.model) next to the "
                                  "artifact or the checkpoint; this model has none")
        return sampled_tokens(reference, window)
    text = eval_text if isinstance(eval_text, EvalText) else load_eval_text(eval_text)
    return text_tokens(text, tok, window, reference.config.vocab_size)


def certify(artifact_dir, checkpoint, *, backend: str = "onnxruntime", eval_text=None, window: int = DEFAULT_WINDOW,
            batch: int = DEFAULT_BATCH, tolerances: "dict | Tolerances | None" = None, scheme: str | None = None,
            greedy=None, threads: int | None = None, progress: "bool | Callable" = False,
            reference=None, session_options: dict | None = None) -> AccuracyCertificate:
    """Teacher-forced certificate of ``artifact_dir`` (export or engine folder) against the fp32
    torch model of ``checkpoint`` (a path or a loaded Checkpoint) over ``eval_text`` (a path,
    an :class:`EvalText`, or None = the built-in corpus). Nothing is written: pass the result
    to :func:`.certificate.write_certificate` to keep it in the manifest.

    ``tolerances``: gate overrides (``{"kl": 0.01, "top1": 0.9}``) or a full Tolerances;
    ``greedy``: an optional :class:`GreedyResult` copied into the certificate as information;
    ``progress``: True for a rich bar on stderr, or a callable(description, total) -> advance;
    ``reference``: a :class:`~.reference.TorchReference` of ``checkpoint`` shared by several
    certificates (its fp32 logits of the text are computed once; the certificate is the same);
    ``session_options``: more options of the artifact's session (e.g. ``int8_block``: a kernel
    form to certify before the export records it).
    """
    from ..runtime import open_session, resolve_artifact
    from .reference import reference_for

    t0 = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    art = resolve_artifact(artifact_dir)
    scheme = scheme or scheme_of(art.manifest)
    torch_ref = reference_for(checkpoint, reference)
    ckpt = torch_ref.checkpoint
    checkpoint_path = Path(ckpt.path)
    limit = min(ckpt.config.max_position_embeddings, art.max_context or ckpt.config.max_position_embeddings)
    window = max(2, min(int(window), limit))
    tol = tolerances if isinstance(tolerances, Tolerances) else default_tolerances(
        _precision_of(art.manifest), scheme).with_overrides(dict(tolerances or {}))
    tokens = _tokens_for(artifact_dir, checkpoint_path, torch_ref, eval_text, window)
    session = open_session(art, backend, threads=threads, **dict(session_options or {}))
    try:
        advance, close = _progress(progress, f"teacher-forced pass, {tokens.scored:,} tokens", tokens.scored)
        try:
            values = teacher_forced(torch_ref.logits_fn(), session_logits_fn(session), tokens.windows, batch,
                                    advance)
        finally:
            close()
    finally:
        session.close()
    thresholds = {k: float(v) for k, v in tol.metrics.items() if k in ("kl", "kl_p99", "top1", "ppl_ratio")}
    failures = gate_failures(values, thresholds)
    return AccuracyCertificate(
        passed=not failures, scheme=scheme, backend=getattr(session, "backend", backend), tokens=tokens.scored,
        windows=len(tokens.windows), window_tokens=max(len(w) for w in tokens.windows), text_source=tokens.source,
        text_sha256=tokens.sha256, thresholds=thresholds, failures=tuple(failures),
        greedy_agreement=None if greedy is None else float(greedy.agreement),
        greedy_first_divergence=None if greedy is None else greedy.first_divergence,
        greedy_margin_at_divergence=None if greedy is None else greedy.top1_margin_at_divergence,
        reference=str(checkpoint_path.resolve()),
        validated=_dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        seconds=round(time.perf_counter() - t0, 3), **values,
    )


def _precision_of(manifest: dict) -> str:
    return str(manifest.get("dtype") or manifest.get("precision") or "fp32")


def _progress(progress, description: str, total: int):
    """(advance(n), close()) for a callable factory, a fresh rich bar (True), or nothing."""
    if callable(progress):
        return progress(description, total), (lambda: None)
    if not progress:
        return None, (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("validate: {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    bar.start()
    task = bar.add_task(description, total=total)
    return (lambda n: bar.advance(task, n)), bar.stop


__all__ = ["DEFAULT_BATCH", "DEFAULT_WINDOW", "EvalTokens", "certify", "gate_failures", "scheme_of",
           "session_logits_fn", "split_windows", "teacher_forced", "text_tokens", "torch_logits_fn"]
