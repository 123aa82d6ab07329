"""Accuracy of quantized exports against their fp32 export (ONNX Runtime, numpy only), and progress bars.

* :func:`eval_tokens`: windows of real text (the validate corpus, tokenized with the
  checkpoint's tokenizer) or, without a tokenizer, a seeded sample of the fp32 export;
  never the calibration text.
* :func:`ort_kl`: mean KL(fp32 export || candidate) over those windows, plain ONNX Runtime
  sessions with ``session.qdq_matmulnbits_accuracy_level=1`` (float compute, the graph's own
  semantics): what int8-sq's fallback and refusal decide on.
* :func:`accuracy_report`: perplexity, top-1, KL and greedy agreement of several candidates
  (tests and benchmarks).

The export's certificate (teacher-forced against the torch model) is
:func:`llama_trt.validate.teacher_forced.certify`; this module is the quick in-loop check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .calibration import ort_generate


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("[bold]quantize[/bold] {task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self._p.__enter__()
        return self

    def task(self, description: str, total: int):
        if self._p is None:
            return lambda: None
        tid = self._p.add_task(description, total=total)
        return lambda: self._p.advance(tid)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False



def heldout_tokens(reference_dir, length: int = 128, seed: int = 1234) -> np.ndarray:
    """Held-out text: a seeded sample (T = 1) of the fp32 reference export from BOS.

    Seed 1234 and a plain BOS start keep it apart from the calibration text (seed 0,
    BOS + random tokens)."""
    from ..exporter.feeds import ort_session
    from ..exporter.manifest import load_manifest

    man = load_manifest(reference_dir)
    bos = man.config.get("bos_token_id") or 0
    return ort_generate(ort_session(reference_dir), man, np.array([[bos]], np.int64), length - 1,
                        rng=np.random.default_rng(seed))[0]


def accuracy_report(reference_dir, candidate_dirs, *, heldout=None, greedy_steps: int = 64,
                    heldout_len: int = 128, exact: bool = False) -> dict[str, Any]:
    """Perplexity, top-1 agreement, KL and greedy agreement of each candidate export vs the reference.

    Metric functions come from :mod:`llama_trt.validate.metrics` (written by the validate
    stage); ``greedy_teacher_forced`` is ours. Teacher-forced metrics (perplexity, top-1, KL)
    run one prefill over the held-out tokens (default: :func:`heldout_tokens`). Greedy:
    ``greedy_agreement`` compares ``greedy_steps`` tokens generated from BOS by each model
    on its own (KV cache; one flip costs every later step); ``greedy_teacher_forced`` is
    the fraction of steps of the reference's greedy sequence where the candidate, fed that
    same sequence, picks the same token (no cascade).

    ``exact``: run ONNX Runtime with ``session.qdq_matmulnbits_accuracy_level=1`` so a
    DequantizeLinear->MatMul that ORT fuses into MatMulNBits computes in fp32 (the graph's
    own semantics); by default ORT (1.32, CPU) uses level 4 there, i.e. it quantizes the
    activations of weight-only layers to int8 on the fly.
    """
    import onnxruntime as ort

    from ..validate.metrics import greedy_agreement, kl_divergence, perplexity, top1_matches
    from ..exporter.feeds import build_feeds, split_outputs
    from ..exporter.manifest import load_manifest

    ref_man = load_manifest(reference_dir)
    tokens = heldout_tokens(reference_dir, heldout_len) if heldout is None else np.asarray(heldout, np.int64)
    bos = ref_man.config.get("bos_token_id") or 0

    def open_session(folder, man):
        o = ort.SessionOptions()
        o.log_severity_level = 3
        if exact:
            o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        return ort.InferenceSession(str(man.model_path(folder)), o, providers=["CPUExecutionProvider"])

    def run(folder):
        man = load_manifest(folder)
        sess = open_session(folder, man)
        logits, _ = split_outputs(man, sess.run(None, build_feeds(man, tokens[None])))
        greedy = ort_generate(sess, man, np.array([[bos]], np.int64), greedy_steps)[0, 1:]
        return man, sess, logits[0], greedy

    _, _, ref_logits, ref_greedy = run(reference_dir)
    ref_traj = np.concatenate([[bos], ref_greedy])[None].astype(np.int64)
    ref_ppl = perplexity(ref_logits, tokens)
    out = {"reference": str(reference_dir), "heldout_tokens": int(tokens.size), "greedy_steps": greedy_steps,
           "exact": exact, "reference_perplexity": ref_ppl, "candidates": {}}
    for folder in ([candidate_dirs] if isinstance(candidate_dirs, (str, Path)) else candidate_dirs):
        man, sess, logits, greedy = run(folder)
        traj_logits, _ = split_outputs(man, sess.run(None, build_feeds(man, ref_traj)))
        tf = float((traj_logits[0, :-1].argmax(-1) == ref_greedy).mean())
        ppl = perplexity(logits, tokens)
        kl = kl_divergence(ref_logits, logits)
        agree, first = greedy_agreement(ref_greedy.tolist(), greedy.tolist())
        scheme = (getattr(man, "quantization", None) or {}).get("scheme", man.dtype)
        out["candidates"][str(folder)] = {
            "scheme": scheme,
            "perplexity": ppl,
            "perplexity_ratio": ppl / ref_ppl,
            "top1_agreement": float(top1_matches(ref_logits, logits).mean()),
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "greedy_agreement": agree,
            "greedy_first_divergence": first,
            "greedy_teacher_forced": tf,
            "model_bytes": man.model_bytes,
        }
    return out


def eval_tokens(base_dir, tokenizer_files=(), *, max_tokens: int = 512, window: int = 128) -> np.ndarray:
    """[windows, window] token ids of real text (the validate corpus), or of the fp32 export's own
    seeded sample when the checkpoint has no tokenizer."""
    from ..exporter.manifest import load_manifest

    files = {Path(f).name: Path(f) for f in tokenizer_files or ()}
    man = load_manifest(base_dir)
    ids: list[int] = []
    if "tokenizer.json" in files or "tokenizer.model" in files:
        from ..validate.corpus import load_eval_text
        from .calibration import _tokenize

        text = load_eval_text(None).text
        ids = _tokenize(Path("corpus"), text, tokenizer_files, man.config.get("bos_token_id")).tolist()
    if len(ids) < 2 * window:
        return heldout_tokens(base_dir, min(window, 128))[None]
    n = min(len(ids), max_tokens) // window
    return np.asarray(ids[: n * window], np.int64).reshape(n, window)


def _plain_session(path, exact: bool = True):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    if exact:
        o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def ort_logits(model_path, manifest, tokens: np.ndarray) -> np.ndarray:
    from ..exporter.feeds import build_feeds, split_outputs

    sess = _plain_session(model_path)
    return np.concatenate([split_outputs(manifest, sess.run(None, build_feeds(manifest, row[None])))[0]
                           for row in tokens])


def ort_kl(reference_logits: np.ndarray, model_path, manifest, tokens: np.ndarray) -> float:
    """Mean KL(reference || candidate) over every position of ``tokens``."""
    from ..validate.metrics import kl_divergence

    cand = ort_logits(model_path, manifest, tokens)
    v = reference_logits.shape[-1]
    return float(kl_divergence(reference_logits.reshape(-1, v), cand.reshape(-1, v)).mean())


__all__ = ["Progress", "accuracy_report", "eval_tokens", "heldout_tokens", "ort_kl", "ort_logits"]
