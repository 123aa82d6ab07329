"""Tokenizers: Hugging Face ``tokenizer.json`` (``tokenizers``) and SentencePiece ``.model``.

Chat templates come from ``tokenizer_config.json`` and are rendered with jinja2 the way
transformers does (sandboxed, trim_blocks/lstrip_blocks, ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``).
:class:`StreamDecoder` turns a growing id sequence into text chunks for streaming.
No tokenizer at all is fine: the runtime then works on ids only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LlamaTrtError


class TokenizerError(LlamaTrtError):
    """A tokenizer file is missing, unreadable, or cannot do what was asked."""


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """Common surface: encode/decode, special ids, chat template."""

    kind = ""

    def __init__(self, path: Path, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.tokenizer_config = config or {}
        self.bos_token: str | None = _token_str(self.tokenizer_config.get("bos_token"))
        self.eos_token: str | None = _token_str(self.tokenizer_config.get("eos_token"))
        tmpl = self.tokenizer_config.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = tmpl

    # to be provided by subclasses
    vocab_size: int = 0
    bos_id: int | None = None
    eos_id: int | None = None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render ``messages`` with the tokenizer's chat template (as transformers does)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.path.parent} has no chat template (tokenizer_config.json "
                                 "'chat_template'); pass a plain prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


def render_chat_template(template: str, messages, *, add_generation_prompt: bool = True, **kwargs) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
    except TemplateError as e:
        raise TokenizerError(f"chat template error: {e}") from None


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library."""

    kind = "tokenizers"

    def __init__(self, path: Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(path, config)
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"cannot read {path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if self.bos_id is None and not self.bos_token:
            for cand in ("<s>", "<|begin_of_text|>", "<bos>"):
                if self._tok.token_to_id(cand) is not None:
                    self.bos_token, self.bos_id = cand, self._tok.token_to_id(cand)
                    break
        if self.eos_id is None and not self.eos_token:
            for cand in ("</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>"):
                if self._tok.token_to_id(cand) is not None:
                    self.eos_token, self.eos_id = cand, self._tok.token_to_id(cand)
                    break
        # does the post-processor add BOS itself?
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self._adds_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        self._want_bos = bool(self.tokenizer_config.get("add_bos_token", self._adds_bos or self.bos_id is not None))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_bos and self._adds_bos).ids
        if add_bos and self._want_bos and self.bos_id is not None and not self._adds_bos:
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece ``.model`` (Llama 1/2, llama2.c)."""

    kind = "sentencepiece"

    def __init__(self, path: Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(path, config)
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.bos_token = self.bos_token or (self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else None)
        self.eos_token = self.eos_token or (self._sp.id_to_piece(self.eos_id) if self.eos_id is not None else None)
        self._want_bos = bool(self.tokenizer_config.get("add_bos_token", True))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._sp.encode(text))
        if add_bos and self._want_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(ids)


def load_tokenizer(path) -> Tokenizer | None:
    """A tokenizer from a file (tokenizer.json / *.model) or a folder holding one; None if the folder has none."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        return None
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path} (expected tokenizer.json or a SentencePiece .model)")
    config: dict[str, Any] = {}
    cfg_file = path.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise TokenizerError(f"cannot read {cfg_file}: {e}") from None
    if path.suffix == ".json":
        return HFTokenizer(path, config)
    return SentencePieceTokenizer(path, config)


class StreamDecoder:
    """Incremental detokenisation: push ids, get the new text suffix.

    Decodes a short window ending at the newest id and emits what extends the previously
    decoded window (the vLLM prefix/read-offset scheme), so sentencepiece's leading-space
    handling stays right; a trailing U+FFFD (an unfinished multi-byte UTF-8 character split
    over byte-fallback tokens) is held back until the next ids complete it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0    # ids already turned into emitted text
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. the end is an unfinished character)."""
        full = self.tok.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "StreamDecoder", "Tokenizer", "TokenizerError",
           "load_tokenizer", "render_chat_template"]
