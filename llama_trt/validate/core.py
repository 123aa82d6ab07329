"""``validate``: torch fp32 reference vs the artifact under ONNX Runtime or TensorRT.

Flow (Polygraphy is the harness):

1. check the inputs (artifact manifest, checkpoint config == manifest config, backend
   installed) -> :class:`ValidationError` / :class:`BackendUnavailableError` (exit 2);
2. build the feed list from real token ids (:mod:`.inputs`) and run
   ``Comparator.run([torch, candidate], data_loader=feeds)``;
3. ``Comparator.compare_accuracy`` with ``SimpleCompareFunc`` (``CompareFunc.simple``'s
   non-deprecated class) and per-output atol/rtol (``""`` = default);
4. LLM metrics from the same RunResults: top-1 agreement, KL, cosine (all valid query
   positions of all feeds), perplexity of the held-out sequence;
5. greedy generation with the KV cache, each backend on its own, through the same runners
   (:mod:`.greedy`; information: its first divergence and the reference's top-2 margin there);
6. the accuracy certificate (:mod:`.teacher_forced`): teacher-forced KL / KL p99 / top-1 /
   perplexity ratio over real text, written into the export's manifest;
7. optionally (``layerwise``) a second comparison on a copy of the ONNX with the layer
   points marked as outputs (:mod:`.layerwise`).

The verdict is the conjunction of the elementwise comparisons, the cosine gate on the feeds
and the certificate's gates (KL, KL p99, top-1, perplexity ratio over the evaluation text);
the feeds' KL / top-1, greedy agreement and the layer-wise table are diagnostics.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import LlamaConfig, Precision
from ..errors import ValidationError
from . import metrics as M
from .report import (
    FeedInfo, LayerPoint, LayerwiseResult, MetricResult, OutputResult, PerplexityResult,
    ValidationReport, finite,
)
from .tolerances import METRICS, Tolerances, default_tolerances

BACKENDS = ("onnxruntime", "tensorrt")


# --------------------------------------------------------------------------------------
# artifact + checkpoint checks
# --------------------------------------------------------------------------------------
class Artifact:
    """What validate needs from an artifact folder (ONNX export or TensorRT engine)."""

    def __init__(self, folder: Path, kind: str, manifest: dict, config: LlamaConfig, precision: Precision,
                 model_file: Path, source_sha256: str | None, kv_dtype: str):
        self.folder, self.kind, self.manifest, self.config = folder, kind, manifest, config
        self.precision, self.model_file, self.source_sha256 = precision, model_file, source_sha256
        self.kv_dtype = np.dtype(kv_dtype)  # past/present (= activation) dtype, from the IO specs
        self.max_tokens: int | None = None  # engines: optimisation-profile limit on seq / context


def _past_dtype(inputs, fallback: str) -> str:
    for t in inputs:
        name = t["name"] if isinstance(t, dict) else t.name
        if name.startswith("past_key_values."):
            return t["dtype"] if isinstance(t, dict) else t.dtype
    return fallback


def open_artifact(folder, backend: str) -> Artifact:
    """ONNX export folder (onnxruntime) or engine folder (tensorrt), through their own loaders."""
    folder = Path(folder)
    if not folder.exists():
        raise ValidationError(f"artifact folder not found: {folder} (pass an export folder from `llama-trt export`)")
    if backend == "onnxruntime":
        from ..exporter import load_manifest
        from ..outputs import manifest_kind

        if manifest_kind(folder) == "engine":
            raise ValidationError(f"{folder} is a TensorRT engine folder; validate it with --backend tensorrt "
                                  "(or pass the export folder it was built from)")

        m = load_manifest(folder)  # ExportError (exit 2) with a clear message
        return Artifact(folder, "onnx", m.to_dict(), m.llama_config, Precision.parse(m.dtype), m.model_path(folder),
                        m.source_sha256, _past_dtype(m.inputs, m.kv_dtype))
    from ..trt_engines.manifest import load_engine_manifest

    e = load_engine_manifest(folder)  # BuildError (exit 2) with a clear message
    sha = (e.source.get("manifest") or {}).get("source_sha256")
    art = Artifact(folder, "engine", e.to_dict(), e.llama_config, Precision.parse(e.precision),
                   folder / e.engine_file, sha, e.kv_dtype)
    limits = e.shape_limits
    if limits.max_batch < 2:
        raise ValidationError(f"{folder}: the engine's max batch is {limits.max_batch}; validation feeds use batch 2 "
                              "(rebuild with a batch limit >= 2)")
    art.max_tokens = min(limits.max_seq, limits.max_context)
    return art


def check_config_match(ckpt_config: LlamaConfig, artifact: Artifact, checkpoint) -> None:
    a, b = ckpt_config.to_dict(), artifact.config.to_dict()
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs artifact {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ValidationError(
            f"checkpoint {checkpoint} does not match the artifact {artifact.folder} "
            f"(config differs: {'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); "
            "pass the checkpoint the artifact was exported from"
        )


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_polygraphy(verbose: bool = False):
    from polygraphy.logger import G_LOGGER

    if verbose:
        yield
        return
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "polygraphy", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    from .runners import tensorrt_version

    trt = tensorrt_version()
    if trt:
        out["tensorrt"] = trt
    return out


def _candidate_session(artifact: Artifact, backend: str):
    """One ONNX Runtime session for the Comparator and the greedy run (each runner would build its own,
    seconds for a 30-layer model); None for TensorRT (its runner deserializes the engine)."""
    if backend != "onnxruntime":
        return None
    from polygraphy.backend.onnxrt import SessionFromOnnx

    return SessionFromOnnx(str(artifact.model_file), providers=["CPUExecutionProvider"])()


def _candidate_runner(artifact: Artifact, backend: str, onnx_path=None, name=None, session=None):
    from .runners import onnxrt_runner, trt_runner

    if backend == "onnxruntime":
        return onnxrt_runner(onnx_path or artifact.model_file, name=name or "onnxruntime", session=session)
    return trt_runner(artifact.model_file, name=name or "tensorrt")


def _gate(name: str, value: float, threshold: float | None) -> MetricResult:
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


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------
def validate(
    artifact_dir,
    checkpoint,
    backend: str = "onnxruntime",
    steps: int = 32,
    tolerances: dict | Tolerances | None = None,
    layerwise: bool = False,
    heldout_tokens=None,
    heldout_length: int = 64,
    seed: int = 0,
    eval_text=None,
    window: int | None = None,
    write_certificate: bool = True,
    run_results_path=None,
    verbose: bool = False,
    progress: bool = False,
    reference=None,
) -> ValidationReport:
    """Validate an artifact against the fp32 torch model of ``checkpoint``.

    ``tolerances``: overrides on top of the precision's defaults (``{"logits": (atol, rtol),
    "present.*": (atol, rtol), "": default, "kl": 1e-4, "top1": 0.98, ...}``) or a full
    :class:`Tolerances`. ``run_results_path``: where to save Polygraphy's RunResults.
    ``eval_text``: the certificate's text file (None: the built-in corpus); ``window``: its
    window length (default 512 tokens, capped by the context); ``write_certificate``: put the
    certificate into the export folder's manifest.json (ONNX exports).
    ``progress``: show the stages on stderr (rich) while it runs. ``reference``: a
    :class:`~.reference.TorchReference` of ``checkpoint`` shared by several validations (the
    torch side runs once: held-out ids, greedy reference, the certificate text's logits; the
    report is the same as without it).
    Raises :class:`ValidationError` / :class:`BackendUnavailableError` (usage problems);
    a failed comparison is a report with ``passed=False``.
    """
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise ValidationError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValidationError(f"steps must be a positive integer, got {steps!r}")
    if backend == "tensorrt":
        from .runners import require_tensorrt

        require_tensorrt()  # fail fast, before loading anything
    artifact = open_artifact(artifact_dir, backend)

    from .reference import reference_for, torch_threads_for

    with Stages(progress, total=6 + bool(layerwise)) as stage:
        stage("load checkpoint")
        ref = reference_for(checkpoint, reference)
        check_config_match(ref.config, artifact, checkpoint)
        with torch_threads_for(ref.config):
            report = _compare(artifact, ref, artifact_dir, checkpoint, backend, steps, tolerances, layerwise,
                              heldout_tokens, heldout_length, seed, run_results_path, verbose, t0, stage,
                              dict(eval_text=eval_text, window=window))
    if write_certificate and artifact.kind == "onnx" and report.certificate is not None:
        from .certificate import write_certificate as _write

        _write(artifact.folder, report.certificate)
    return report


class Stages:
    """A rich progress bar over named stages (a no-op when ``enabled`` is False)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress = self._task = None

    def __enter__(self) -> "Stages":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("validate: {task.description}"), BarColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("start", total=self.total)
        return self

    def __call__(self, description: str) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            if task.description != "start":
                self._progress.advance(self._task)
            self._progress.update(self._task, description=description)

    def subtask(self, description: str, total: int):
        """A second bar under the stage bar (for a long stage); returns advance(n)."""
        if self._progress is None:
            return None
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _compare(artifact, ref, artifact_dir, checkpoint, backend, steps, tolerances, layerwise, heldout_tokens,
             heldout_length, seed, run_results_path, verbose, t0, stage, cert_options) -> ValidationReport:
    ckpt = ref.checkpoint
    notes = []
    if artifact.source_sha256 and artifact.source_sha256 != ref.fingerprint():
        notes.append(
            "checkpoint files differ from the ones the artifact was made from (sha256 mismatch); "
            "same config, so comparing anyway"
        )
    if isinstance(tolerances, Tolerances):
        tol = tolerances
    else:
        from .teacher_forced import scheme_of

        scheme = scheme_of(artifact.manifest)
        tol = default_tolerances(artifact.precision, scheme).with_overrides(dict(tolerances or {}))
    cfg = ckpt.config

    stage("reference feeds from real token ids")
    from .inputs import build_feed_list, describe

    if heldout_tokens is None:
        n = min(heldout_length, cfg.max_position_embeddings, artifact.max_tokens or heldout_length)
        heldout = ref.sample_tokens(n, seed=seed, bos=cfg.bos_token_id)
    else:
        heldout = [int(t) for t in heldout_tokens]
        bad = [t for t in heldout if not 0 <= t < cfg.vocab_size]
        if len(heldout) < 16 or bad:
            raise ValidationError(f"held-out tokens must be >= 16 ids in 0..{cfg.vocab_size - 1}")
    prompt = heldout[:8]
    limit = min(cfg.max_position_embeddings, artifact.max_tokens or cfg.max_position_embeddings)
    if len(prompt) + steps > limit:
        raise ValidationError(f"--steps {steps} + prompt {len(prompt)} exceeds the context limit {limit}; use fewer steps")
    feeds = build_feed_list(ref.model, heldout, artifact.kv_dtype)
    feed_names = [f.name for f in feeds]

    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException

    from .runners import TorchRunner, output_names

    ref_runner = TorchRunner(ckpt, past_dtype=artifact.kv_dtype, name="torch-fp32")
    cand_session = _candidate_session(artifact, backend)
    cand_runner = _candidate_runner(artifact, backend, session=cand_session)
    names = output_names(cfg.num_layers)
    unknown = tol.unmatched(names)
    if unknown:
        raise ValidationError(
            f"--tol names no output: {', '.join(unknown)} (outputs: logits, present.{{i}}.key/value, "
            "layerwise.* with --layerwise; metrics: " + ", ".join(METRICS) + ")"
        )
    atol, rtol = tol.resolve(names)
    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
    stage(f"Comparator.run: torch fp32 vs {backend} ({len(feeds)} feeds)")
    try:
        with quiet_polygraphy(verbose):
            run_results = Comparator.run([ref_runner, cand_runner], data_loader=[f.feed for f in feeds])
            accuracy = Comparator.compare_accuracy(run_results, compare_func=compare)[0]
            if run_results_path is not None:
                run_results.save(str(run_results_path))
    except PolygraphyException as e:
        raise ValidationError(f"running the artifact failed (does it follow the IO contract?): {e}") from None
    pair = (ref_runner.name, cand_runner.name)
    outputs = _output_results(accuracy, feed_names, tol, pair)

    # ---- LLM metrics over every real query position of every feed ----------
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
    kl, top1, cos = np.concatenate(kl), np.concatenate(top1), np.concatenate(cos)

    stage(f"greedy generation, {steps} steps per backend")
    from .greedy import greedy_result

    greedy_runner = _candidate_runner(artifact, backend, name=f"{backend}-greedy", session=cand_session)
    try:
        with quiet_polygraphy(verbose):
            greedy = greedy_result(ref, greedy_runner, prompt, steps, artifact.kv_dtype)
    except PolygraphyException as e:
        raise ValidationError(f"greedy generation on the artifact failed: {e}") from None
    del cand_runner, greedy_runner, cand_session  # the certificate opens the runtime's own session

    stage("teacher-forced certificate over the evaluation text")
    certificate = _certificate(artifact, ref, backend, tol, greedy, stage, cert_options)
    thresholds = tol.metrics
    metric_results = [
        *_certificate_metrics(certificate),
        _gate("cosine", float(cos.mean()), thresholds.get("cosine")),
        MetricResult("feeds_top1", finite(float(top1.mean())), None, "", None, "top-1 agreement on the feeds (info)"),
        MetricResult("feeds_kl", finite(float(kl.mean())), None, "", None, "mean KL on the feeds (info)"),
        MetricResult("greedy", finite(float(greedy.agreement)), None, "", None,
                     "greedy-token agreement over the generation (info: see its first divergence)"),
        MetricResult("kl_max", finite(float(kl.max())), None, "", None, "max KL over the feeds' positions (info)"),
        MetricResult("cosine_min", finite(float(cos.min())), None, "", None, "min cosine over positions (info)"),
        MetricResult("positions", float(len(kl)), None, "", None, "positions compared for top1/kl/cosine"),
        MetricResult("ppl_reference", finite(ppl_ref), None, "", None, "perplexity of the held-out ids, torch fp32"),
        MetricResult("ppl_candidate", finite(ppl_cand), None, "", None, f"perplexity of the held-out ids, {backend}"),
    ]
    perplexity = PerplexityResult(
        tokens=len(heldout), reference=finite(ppl_ref), candidate=finite(ppl_cand),
        relative_difference=finite(abs(ppl_cand - ppl_ref) / ppl_ref),
    )

    # ---- layer-wise ------------------------------------------------------------
    layer_result = None
    if layerwise:
        stage("layer-wise comparison")
        layer_result = _layerwise(artifact, backend, ckpt, feeds[0], tol, verbose)

    failures = []
    failed_by_output: dict[str, list[OutputResult]] = {}
    for o in outputs:
        if not o.passed:
            failed_by_output.setdefault(o.output, []).append(o)
    for name, rows in failed_by_output.items():  # one line per output: its worst feed
        w = max(rows, key=lambda r: r.max_abs)
        failures.append(
            f"output {name}: max abs error {w.max_abs:.3g} (max rel {w.max_rel:.3g}) exceeds atol {w.atol:g} / "
            f"rtol {w.rtol:g} (worst feed {w.feed}; failing feeds: {', '.join(r.feed for r in rows)})"
        )
    for m in metric_results:
        if m.passed is False:
            failures.append(f"metric {m.name}: {m.value:.6g} fails {m.op} {m.threshold:g} ({m.description})")

    report = ValidationReport(
        artifact=str(Path(artifact_dir).resolve()),
        artifact_kind=artifact.kind,
        checkpoint=str(Path(checkpoint).resolve()),
        backend=backend,
        precision=artifact.precision.value,
        passed=not failures,
        failures=tuple(failures),
        feeds=tuple(FeedInfo(**describe(f)) for f in feeds),
        heldout_tokens=tuple(heldout),
        tolerances={k: (float(v[0]), float(v[1])) for k, v in tol.elementwise.items()},
        metric_thresholds={k: float(v) for k, v in tol.metrics.items()},
        outputs=tuple(outputs),
        metrics=tuple(metric_results),
        greedy=greedy,
        perplexity=perplexity,
        layerwise=layer_result,
        versions=tool_versions(),
        manifest=artifact.manifest,
        notes=tuple(notes),
        run_results=str(Path(run_results_path).resolve()) if run_results_path is not None else None,
        seconds=round(time.perf_counter() - t0, 3),
        certificate=certificate,
    )
    return report


def _certificate(artifact, ref, backend, tol, greedy, stage, options):
    from .teacher_forced import DEFAULT_WINDOW, certify

    try:
        return certify(artifact.folder, ref.checkpoint, backend=backend, eval_text=options.get("eval_text"),
                       window=options.get("window") or DEFAULT_WINDOW, tolerances=tol, greedy=greedy,
                       progress=stage.subtask if stage.enabled else False, reference=ref)
    except (ValueError, RuntimeError) as e:  # a backend that cannot run the windows
        raise ValidationError(f"the teacher-forced pass on the artifact failed: {str(e).splitlines()[0]}") from None


def _certificate_metrics(cert) -> list[MetricResult]:
    from .tolerances import METRICS as DESC

    out = []
    for name in ("kl", "kl_p99", "top1", "ppl_ratio"):
        thr = cert.thresholds.get(name)
        value = getattr(cert, name)
        passed = None if thr is None else not any(f.startswith(f"metric {name}:") for f in cert.failures)
        out.append(MetricResult(name, finite(value), thr, DESC[name][0] if thr is not None else "", passed,
                                DESC[name][1]))
    out.append(MetricResult("eval_tokens", float(cert.tokens), None, "", None,
                            f"tokens scored teacher-forced ({cert.text_source})"))
    out.append(MetricResult("eval_ppl_reference", finite(cert.ppl_reference), None, "", None,
                            "perplexity of the evaluation text, torch fp32"))
    out.append(MetricResult("eval_ppl_candidate", finite(cert.ppl_candidate), None, "", None,
                            f"perplexity of the evaluation text, {cert.backend}"))
    return out


def _layerwise(artifact: Artifact, backend: str, ckpt, feed, tol: Tolerances, verbose: bool) -> LayerwiseResult:
    from onnx import TensorProto
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from . import layerwise as LW
    from .runners import TorchRunner

    if artifact.kind != "onnx":
        raise ValidationError(
            "--layerwise needs the ONNX export (it marks intermediate tensors as outputs); "
            "run it with --backend onnxruntime on the export folder"
        )
    elem = TensorProto.FLOAT16 if artifact.kv_dtype == np.float16 else TensorProto.FLOAT
    with tempfile.TemporaryDirectory(prefix="llama-trt-layerwise-") as tmp:
        marked = Path(tmp) / "model.layerwise.onnx"
        points = LW.mark_layer_outputs(artifact.model_file, marked, ckpt.config.num_layers, elem)
        ref = TorchRunner(ckpt, past_dtype=artifact.kv_dtype, capture=LW.torch_capture(points), name="torch-layerwise")
        cand = _candidate_runner(artifact, backend, onnx_path=marked, name=f"{backend}-layerwise")
        names = [p.output_name for p in points]
        atol, rtol = tol.resolve(names)
        compare = SimpleCompareFunc(
            atol=atol, rtol=rtol, check_error_stat="elemwise",
            find_output_func=lambda name, index, result: [name] if name in names else None,
        )
        with quiet_polygraphy(verbose):
            with ref:  # count check: RMSNorm modules in torch == RMSNorm nodes in the graph
                n_torch = LW.count_torch_norms(ref.model)
            if n_torch != 2 * ckpt.config.num_layers + 1:
                raise ValidationError(f"layerwise: torch model has {n_torch} RMSNorm modules, graph mapping needs "
                                      f"{2 * ckpt.config.num_layers + 1}")
            results = Comparator.run([ref, cand], data_loader=[feed.feed])
            accuracy = Comparator.compare_accuracy(results, compare_func=compare)[0]
    per_output = accuracy[(ref.name, cand.name)][0]
    rows = []
    for idx, p in enumerate(points):
        res = per_output[p.output_name]
        a, r = tol.for_output(p.output_name)
        rows.append(LayerPoint(
            index=idx, layer=p.layer, point=p.name, onnx_tensor=p.onnx_tensor, max_abs=finite(res.max_absdiff),
            mean_abs=finite(res.mean_absdiff), max_rel=finite(res.max_reldiff), atol=a, rtol=r, passed=bool(res),
        ))
    first = next((row for row in rows if not row.passed), None)
    return LayerwiseResult(
        feed=feed.name, points=tuple(rows),
        first_failing_layer=None if first is None else first.layer,
        first_failing_point=None if first is None else first.point,
    )
