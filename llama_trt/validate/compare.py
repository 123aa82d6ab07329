"""The elementwise half of ``validate``: Polygraphy's Comparator over the feeds, and what the
same RunResults say about the model (KL, top-1, cosine per position, held-out perplexity).

:func:`compare_feeds` runs ``Comparator.run([torch, candidate], data_loader=feeds)`` and
``Comparator.compare_accuracy`` with per-output atol/rtol; :func:`feed_metrics` reads the LLM
metrics from the same results; :func:`failures_of` turns failed outputs and gates into the
report's one-line failures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ..errors import ValidationError
from . import metrics as M
from .report import MetricResult, OutputResult, finite
from .tolerances import METRICS, Tolerances


@contextlib.contextmanager
def quiet_polygraphy(verbose: bool = False):
    from polygraphy.logger import G_LOGGER

    if verbose:
        yield
        return
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def candidate_session(artifact, backend: str):
    """One ONNX Runtime session for the Comparator and the greedy run (each runner would build its own,
    seconds for a 30-layer model); None for TensorRT (its runner deserializes the engine)."""
    if backend != "onnxruntime":
        return None
    from polygraphy.backend.onnxrt import SessionFromOnnx

    return SessionFromOnnx(str(artifact.model_file), providers=["CPUExecutionProvider"])()


def candidate_runner(artifact, backend: str, onnx_path=None, name=None, session=None):
    from .runners import onnxrt_runner, trt_runner

    if backend == "onnxruntime":
        return onnxrt_runner(onnx_path or artifact.model_file, name=name or "onnxruntime", session=session)
    return trt_runner(artifact.model_file, name=name or "tensorrt")


def gate(name: str, value: float, threshold: float | None) -> MetricResult:
    op, desc = METRICS[name]
    if threshold is None:
        return MetricResult(name, finite(value), None, "", None, desc)
    ok = value >= threshold if op == ">=" else value <= threshold
    ok = bool(ok) and not np.isnan(value)
    return MetricResult(name, finite(value), float(threshold), op, ok, desc)


def _output_results(accuracy, feed_names, tolerances: Tolerances, runner_pair) -> list[OutputResult]:
    out = []
    for it, per_output in enumerate(accuracy[runner_pair]):
        for name, res in per_output.items():
            atol, rtol = tolerances.for_output(name)
            out.append(OutputResult(
                feed=feed_names[it], output=name, max_abs=finite(res.max_absdiff), mean_abs=finite(res.mean_absdiff),
                max_rel=finite(res.max_reldiff), atol=atol, rtol=rtol, passed=bool(res),
            ))
    return out


def compare_feeds(artifact, ckpt, backend: str, feeds, tol: Tolerances, session, *, run_results_path=None,
                  verbose: bool = False):
    """(RunResults, per-output results) of torch fp32 vs the artifact on ``feeds``."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException

    from .runners import TorchRunner, output_names

    ref_runner = TorchRunner(ckpt, past_dtype=artifact.kv_dtype, name="torch-fp32")
    cand_runner = candidate_runner(artifact, backend, session=session)
    names = output_names(ckpt.config.num_layers)
    unknown = tol.unmatched(names)
    if unknown:
        raise ValidationError(
            f"--tol names no output: {', '.join(unknown)} (outputs: logits, present.{{i}}.key/value, "
            "layerwise.* with --layerwise; metrics: " + ", ".join(METRICS) + ")"
        )
    atol, rtol = tol.resolve(names)
    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
    try:
        with quiet_polygraphy(verbose):
            run_results = Comparator.run([ref_runner, cand_runner], data_loader=[f.feed for f in feeds])
            accuracy = Comparator.compare_accuracy(run_results, compare_func=compare)[0]
            if run_results_path is not None:
                run_results.save(str(run_results_path))
    except PolygraphyException as e:
        raise ValidationError(f"running the artifact failed (does it follow the IO contract?): {e}") from None
    outputs = _output_results(accuracy, [f.name for f in feeds], tol, (ref_runner.name, cand_runner.name))
    return run_results, outputs


@dataclass(frozen=True)
class FeedMetrics:
    """Per-position KL / top-1 / cosine over every real query position of every feed, and the
    perplexity of the held-out ids under each model."""

    kl: np.ndarray
    top1: np.ndarray
    cosine: np.ndarray
    ppl_reference: float
    ppl_candidate: float


def feed_metrics(feeds, run_results, heldout: list[int]) -> FeedMetrics:
    ref_iters, cand_iters = run_results[0][1], run_results[1][1]
    kl, top1, cos = [], [], []
    ppl_ref = ppl_cand = float("nan")
    for f, ri, ci in zip(feeds, ref_iters, cand_iters):
        r = np.asarray(ri["logits"], dtype=np.float64)[f.valid]
        c = np.asarray(ci["logits"], dtype=np.float64)[f.valid]
        kl.append(M.kl_divergence(r, c))
        top1.append(M.top1_matches(r, c))
        cos.append(M.cosine_similarity(r, c))
        if f.name == "heldout":
            ppl_ref = M.perplexity(np.asarray(ri["logits"])[0], heldout)
            ppl_cand = M.perplexity(np.asarray(ci["logits"])[0], heldout)
    return FeedMetrics(np.concatenate(kl), np.concatenate(top1), np.concatenate(cos), ppl_ref, ppl_cand)


def feed_metric_results(fm: FeedMetrics, greedy, thresholds: dict, backend: str) -> list[MetricResult]:
    """The cosine gate on the feeds, then the feeds' diagnostics (information, no gate)."""

    def info(name: str, value: float, description: str) -> MetricResult:
        return MetricResult(name, finite(value), None, "", None, description)

    return [
        gate("cosine", float(fm.cosine.mean()), thresholds.get("cosine")),
        info("feeds_top1", float(fm.top1.mean()), "top-1 agreement on the feeds (info)"),
        info("feeds_kl", float(fm.kl.mean()), "mean KL on the feeds (info)"),
        info("greedy", float(greedy.agreement),
             "greedy-token agreement over the generation (info: see its first divergence)"),
        info("kl_max", float(fm.kl.max()), "max KL over the feeds' positions (info)"),
        info("cosine_min", float(fm.cosine.min()), "min cosine over positions (info)"),
        info("positions", float(len(fm.kl)), "positions compared for top1/kl/cosine"),
        info("ppl_reference", fm.ppl_reference, "perplexity of the held-out ids, torch fp32"),
        info("ppl_candidate", fm.ppl_candidate, f"perplexity of the held-out ids, {backend}"),
    ]


def failures_of(outputs: list[OutputResult], metric_results: list[MetricResult]) -> list[str]:
    """One line per failed output (its worst feed) and per failed gate."""
    failures = []
    failed_by_output: dict[str, list[OutputResult]] = {}
    for o in outputs:
        if not o.passed:
            failed_by_output.setdefault(o.output, []).append(o)
    for name, rows in failed_by_output.items():
        w = max(rows, key=lambda r: r.max_abs)
        failures.append(
            f"output {name}: max abs error {w.max_abs:.3g} (max rel {w.max_rel:.3g}) exceeds atol {w.atol:g} / "
            f"rtol {w.rtol:g} (worst feed {w.feed}; failing feeds: {', '.join(r.feed for r in rows)})"
        )
    for m in metric_results:
        if m.passed is False:
            failures.append(f"metric {m.name}: {m.value:.6g} fails {m.op} {m.threshold:g} ({m.description})")
    return failures
