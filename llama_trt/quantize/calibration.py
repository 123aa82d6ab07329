"""Calibration tokens for quantization (SmoothQuant statistics, AWQ scale search), and small ONNX Runtime generation helpers.

Sources of calibration token ids (``[samples, seq]`` int64):

* ``--calib-data FILE``:

  - ``.npy``: integer token ids, 1-D (one stream, cut into rows) or 2-D (one row per sample);
  - ``.txt`` holding only integers separated by commas / whitespace: token ids (one stream);
  - any other text file: tokenised with the checkpoint's tokenizer (``tokenizer.json`` via
    ``tokenizers`` or ``tokenizer.model`` via ``sentencepiece``), BOS first; a checkpoint
    without a tokenizer cannot read text (the error says to pass token ids instead).

  A stream is cut into rows of ``seq_len`` ids; the rows are used as they are (no BOS is
  inserted into id files).
* built-in default (no file): text the fp32 model itself finds plausible, so the activation
  statistics look like real ones: each row is BOS + 3 seeded uniformly random tokens, then a
  seeded *sampled* continuation (temperature 1) of the fp32 export run in ONNX Runtime with
  its KV cache (sampled rather than greedy: greedy continuations of small models loop and
  would cover a handful of tokens only). Seed 0; the test/accuracy held-out text uses other seeds.

The SHA-256 recorded in the manifest is that of the file's bytes, or for the built-in
default that of the generated ``int64`` id array (little-endian, C order).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 64
BUILTIN_PROMPT_RANDOM = 3
_INT_TEXT = re.compile(r"^[\s,]*-?\d+([\s,]+-?\d+)*[\s,]*$")


@dataclass(frozen=True)
class CalibrationData:
    tokens: np.ndarray          # [samples, seq] int64
    source: str                 # file path or "builtin:..."
    sha256: str

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    def to_dict(self) -> dict:
        return {
            "source": self.source, "sha256": self.sha256, "samples": self.samples,
            "seq_len": int(self.tokens.shape[1]), "tokens": int(self.tokens.size),
        }


def _bad(path: Path, why: str) -> ExportError:
    return ExportError(f"--calib-data {path}: {why}")


def check_calibration_file(path) -> None:
    """Cheap checks before any export work: exists, is a file, readable, a known kind."""
    path = Path(path)
    if not path.exists():
        raise _bad(path, "file not found (pass a .txt of text or token ids, or a .npy of token ids)")
    if not path.is_file():
        raise _bad(path, "is not a file (pass a .txt of text or token ids, or a .npy of token ids)")
    if path.suffix.lower() == ".npy":
        _read_npy(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, f"unreadable as UTF-8 text ({type(e).__name__}); pass a .txt or a .npy of token ids") from None
    if not text.strip():
        raise _bad(path, "is empty; it needs text or token ids")


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / pickle errors
        raise _bad(path, f"not a readable .npy array ({str(e).splitlines()[0][:120]})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise _bad(path, f"holds {arr.dtype} values; token ids must be integers")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise _bad(path, f"must be a non-empty 1-D or 2-D array of token ids, got shape {list(arr.shape)}")
    return arr.astype(np.int64)


def _tokenize(path: Path, text: str, tokenizer_files, bos: int | None) -> np.ndarray:
    files = {Path(f).name: Path(f) for f in tokenizer_files or ()}
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        ids = tok.encode(text, add_special_tokens=False).ids
    elif "tokenizer.model" in files:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(files["tokenizer.model"]))
        ids = sp.encode(text)
    else:
        raise _bad(path, "is text but the checkpoint has no tokenizer (tokenizer.json / tokenizer.model); "
                         "pass token ids instead (.npy, or a .txt of comma/space separated integers)")
    ids = ([bos] if bos is not None else []) + list(ids)
    return np.asarray(ids, dtype=np.int64)


def load_calibration_file(path, *, vocab_size: int, samples: int, seq_len: int = DEFAULT_SEQ_LEN,
                          tokenizer_files=(), bos: int | None = 1) -> CalibrationData:
    """Read ``path`` into ``[min(samples, available), seq]`` token ids (see module doc)."""
    path = Path(path)
    check_calibration_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix.lower() == ".npy":
        arr = _read_npy(path)
    else:
        text = path.read_text(encoding="utf-8")
        if _INT_TEXT.match(text):
            arr = np.asarray([int(t) for t in re.split(r"[\s,]+", text.strip()) if t], dtype=np.int64)
        else:
            arr = _tokenize(path, text, tokenizer_files, bos)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise _bad(path, f"token id {int(arr[bad].flat[0])} is outside the vocabulary 0..{vocab_size - 1}")
    if arr.ndim == 1:
        if arr.size < 2:
            raise _bad(path, "needs at least 2 tokens")
        n = max(1, arr.size // seq_len)
        length = min(seq_len, arr.size)
        arr = arr[: n * length].reshape(n, length)
    arr = np.ascontiguousarray(arr[:samples])
    return CalibrationData(arr, str(path.resolve()), digest)


# ---------------------------------------------------------------------------------------
# ONNX Runtime generation (numpy only)
def ort_generate(session, manifest, prompts: np.ndarray, steps: int, *, rng: np.random.Generator | None = None,
                 temperature: float = 1.0, on_step=None) -> np.ndarray:
    """Prompts [batch, p] (no padding) + ``steps`` new tokens each: greedy when ``rng`` is None,
    else sampled at ``temperature``. Returns [batch, p + steps]."""
    from ..exporter.feeds import build_feeds, split_outputs

    ids = np.asarray(prompts, dtype=np.int64)
    out = [ids]
    logits, past = split_outputs(manifest, session.run(None, build_feeds(manifest, ids)))
    total = ids.shape[1]
    for _ in range(steps):
        last = logits[:, -1].astype(np.float64)
        if rng is None:
            nxt = last.argmax(-1)
        else:
            z = last / temperature
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            nxt = np.array([rng.choice(p.shape[-1], p=row) for row in p])
        nxt = nxt.astype(np.int64)[:, None]
        out.append(nxt)
        total += 1
        if on_step is not None:
            on_step()
        if len(out) - 1 == steps:
            break
        mask = np.ones((ids.shape[0], total), np.int64)
        logits, past = split_outputs(manifest, session.run(None, build_feeds(manifest, nxt, mask, past=past)))
    return np.concatenate(out, axis=1)


def builtin_calibration(session, manifest, *, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                        seed: int = 0, on_step=None) -> CalibrationData:
    """BOS + 3 seeded random tokens + the fp32 model's own sampled continuation (T = 1)."""
    cfg = manifest.config
    rng = np.random.default_rng(seed)
    bos = cfg.get("bos_token_id")
    n_rand = max(0, min(BUILTIN_PROMPT_RANDOM, seq_len - 2))
    prompt = rng.integers(0, int(cfg["vocab_size"]), (samples, n_rand), dtype=np.int64)
    if bos is not None:
        prompt = np.concatenate([np.full((samples, 1), bos, np.int64), prompt], axis=1)
    steps = max(0, seq_len - prompt.shape[1])
    tokens = ort_generate(session, manifest, prompt, steps, rng=rng, on_step=on_step)
    tokens = np.ascontiguousarray(tokens.astype("<i8"))
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()
    source = (f"builtin:seed={seed}:bos+{n_rand}-random-tokens+fp32-sampled-continuation(T=1)")
    return CalibrationData(tokens, source, digest)


__all__ = [
    "CalibrationData", "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN", "builtin_calibration", "check_calibration_file",
    "load_calibration_file", "ort_generate",
]
