"""``validate``: torch fp32 reference vs the artifact under ONNX Runtime or TensorRT.

Flow (Polygraphy is the harness):

1. check the inputs (artifact manifest, checkpoint config == manifest config, backend
   installed) -> :class:`ValidationError` / :class:`BackendUnavailableError` (exit 2);
2. build the feed list from real token ids (:mod:`.inputs`) and run
   ``Comparator.run([torch, candidate], data_loader=feeds)``;
3. ``Comparator.compare_accuracy`` with ``SimpleCompareFunc`` (``CompareFunc.simple``'s
   non-deprecated class) and per-output atol/rtol (``""`` = default);
4. LLM metrics from the same RunResults: top-1 agreement, KL, cosine (all valid query
   positions of all feeds), perplexity of the held-out sequence (steps 2-4: :mod:`.compare`);
5. greedy generation with the KV cache, each backend on its own, through the same runners
   (:mod:`.greedy`; information: its first divergence and the reference's top-2 margin there);
6. the accuracy certificate (:mod:`.teacher_forced`): teacher-forced KL / KL p99 / top-1 /
   perplexity ratio over real text, written into the export's manifest;
7. optionally (``layerwise``) a second comparison on a copy of the ONNX with the layer
   points marked as outputs (:func:`.layerwise.compare_layers`).

The verdict is the conjunction of the elementwise comparisons, the cosine gate on the feeds
and the certificate's gates (KL, KL p99, top-1, perplexity ratio over the evaluation text);
the feeds' KL / top-1, greedy agreement and the layer-wise table are diagnostics.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import LlamaConfig, Precision
from ..errors import ValidationError
from . import compare as C
from .report import FeedInfo, MetricResult, PerplexityResult, ValidationReport, finite
from .tolerances import Tolerances, default_tolerances

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
    tol = _tolerances_for(artifact, tolerances)

    stage("reference feeds from real token ids")
    from .inputs import build_feed_list, describe

    heldout, prompt = _heldout_ids(artifact, ref, heldout_tokens, heldout_length, seed, steps)
    feeds = build_feed_list(ref.model, heldout, artifact.kv_dtype)

    stage(f"Comparator.run: torch fp32 vs {backend} ({len(feeds)} feeds)")
    session = C.candidate_session(artifact, backend)
    run_results, outputs = C.compare_feeds(artifact, ckpt, backend, feeds, tol, session,
                                           run_results_path=run_results_path, verbose=verbose)
    fm = C.feed_metrics(feeds, run_results, heldout)

    stage(f"greedy generation, {steps} steps per backend")
    from polygraphy.exception import PolygraphyException

    from .greedy import greedy_result

    greedy_runner = C.candidate_runner(artifact, backend, name=f"{backend}-greedy", session=session)
    try:
        with C.quiet_polygraphy(verbose):
            greedy = greedy_result(ref, greedy_runner, prompt, steps, artifact.kv_dtype)
    except PolygraphyException as e:
        raise ValidationError(f"greedy generation on the artifact failed: {e}") from None
    del greedy_runner, session  # the certificate opens the runtime's own session

    stage("teacher-forced certificate over the evaluation text")
    certificate = _certificate(artifact, ref, backend, tol, greedy, stage, cert_options)
    metric_results = [*_certificate_metrics(certificate), *C.feed_metric_results(fm, greedy, tol.metrics, backend)]

    layer_result = None
    if layerwise:
        stage("layer-wise comparison")
        from .layerwise import compare_layers

        layer_result = compare_layers(artifact, backend, ckpt, feeds[0], tol, verbose)

    failures = C.failures_of(outputs, metric_results)
    return ValidationReport(
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
        perplexity=PerplexityResult(
            tokens=len(heldout), reference=finite(fm.ppl_reference), candidate=finite(fm.ppl_candidate),
            relative_difference=finite(abs(fm.ppl_candidate - fm.ppl_reference) / fm.ppl_reference),
        ),
        layerwise=layer_result,
        versions=tool_versions(),
        manifest=artifact.manifest,
        notes=tuple(notes),
        run_results=str(Path(run_results_path).resolve()) if run_results_path is not None else None,
        seconds=round(time.perf_counter() - t0, 3),
        certificate=certificate,
    )


def _tolerances_for(artifact, tolerances) -> Tolerances:
    """A full :class:`Tolerances` as given, else the artifact scheme's defaults with the overrides."""
    if isinstance(tolerances, Tolerances):
        return tolerances
    from .teacher_forced import scheme_of

    scheme = scheme_of(artifact.manifest)
    return default_tolerances(artifact.precision, scheme).with_overrides(dict(tolerances or {}))


def _heldout_ids(artifact, ref, heldout_tokens, heldout_length: int, seed: int, steps: int):
    """(held-out ids, the greedy prompt: their first 8), checked against the vocab and the context."""
    cfg = ref.config
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
    return heldout, prompt


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


