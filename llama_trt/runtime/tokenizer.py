"""Tokenizers with transformers' semantics: ``tokenizer.json`` (``tokenizers``) and SentencePiece ``.model``.

What a checkpoint's files say is what happens, as in transformers:

- BOS/EOS on plain text: with a ``tokenizer.json``, its post-processor alone decides (none:
  nothing is added); transformers 5 ignores ``add_bos_token`` / ``add_eos_token`` of
  ``tokenizer_config.json`` then, and so do we. SmolLM2's tokenizer adds nothing; Llama 2/3's
  add ``<s>`` / ``<|begin_of_text|>``. A bare SentencePiece ``.model`` (Meta, llama2.c) adds
  BOS unless ``tokenizer_config.json`` says ``add_bos_token: false`` (and EOS if it says
  ``add_eos_token: true``).
- End of sequence: the ``eos_token`` plus every id of ``generation_config.json``'s
  ``eos_token_id`` (an int or a list).
- Chat template: ``chat_template.jinja`` (current ``save_pretrained``), else
  ``tokenizer_config.json`` ``chat_template`` (a string, or a list of named templates: the one
  named ``default``), else ``chat_template.json``; GGUF metadata arrives as
  ``chat_template.jinja`` (see ``checkpoint/gguf.py``). Rendered in jinja2's immutable sandbox
  with transformers' settings (:mod:`.chat_template`); the rendered text is tokenized without
  adding special tokens, as ``apply_chat_template(..., tokenize=True)`` does.

No tokenizer at all is fine: the runtime then works on ids only. Never imports torch nor click.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chat_template import TokenizerError, render_chat_template

CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _pick_template(value, source: Path) -> str | None:
    """A template string; for a list of named templates, the one named ``default`` (as transformers)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise TokenizerError(f"{source} has several chat templates ({', '.join(map(str, named))}) and none named "
                             "'default'; pass one with --chat-template FILE")
    raise TokenizerError(f"{source}: 'chat_template' must be a string or a list of named templates")


def find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's chat template, in transformers' order of precedence (None if it has none)."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config.get("chat_template") is not None:
        return _pick_template(config["chat_template"], folder / "tokenizer_config.json")
    legacy = folder / LEGACY_CHAT_TEMPLATE_FILE
    if legacy.is_file():
        return _pick_template(_read_json(legacy).get("chat_template"), legacy)
    return None


def read_chat_template_file(path) -> str:
    """A ``--chat-template FILE``: jinja text, or a JSON file holding ``chat_template``."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"chat template not found: {path} (expected a .jinja file)")
    if path.suffix == ".json":
        template = _pick_template(_read_json(path).get("chat_template"), path)
        if not template:
            raise TokenizerError(f"{path} has no 'chat_template'")
        return template
    return path.read_text(encoding="utf-8")


def _eos_ids_from(generation: dict[str, Any]) -> tuple[int, ...]:
    value = generation.get("eos_token_id")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(int(v) for v in value if isinstance(v, int))
    return ()


class Tokenizer:
    """Common surface: encode/decode, special ids, chat template."""

    kind = ""
    vocab_size: int = 0
    bos_id: int | None = None
    eos_id: int | None = None

    def __init__(self, path: Path, config: dict[str, Any] | None = None, *,
                 generation: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
        self.path = Path(path)
        self.tokenizer_config = config or {}
        self.generation_config = generation or {}
        self.special_tokens = {k: _token_str(self.tokenizer_config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template = chat_template

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens["eos_token"]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply: the eos token and generation_config.json's eos_token_id list."""
        ids = [self.eos_id] if self.eos_id is not None else []
        ids += [i for i in _eos_ids_from(self.generation_config) if i not in ids]
        return tuple(ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``; ``add_bos``: add the special tokens the checkpoint's files ask for
        (transformers' ``add_special_tokens``)."""
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render ``messages`` with the tokenizer's chat template (as transformers does)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.path.parent} has no chat template (chat_template.jinja or "
                                 "tokenizer_config.json 'chat_template'); pass --chat-template FILE or a plain prompt")
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**specials, **kwargs})

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """``apply_chat_template(..., tokenize=True)``: the template writes its own special tokens."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_bos=False)


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library; its post-processor adds BOS/EOS."""

    kind = "tokenizers"

    def __init__(self, path: Path, config: dict[str, Any] | None = None, **kwargs) -> None:
        super().__init__(path, config, **kwargs)
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"cannot read {path}: {e}") from None
        self._register_special_tokens()
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _register_special_tokens(self) -> None:
        """Named special tokens missing from the added tokens become special added tokens
        (transformers does the same), so they are never split when they appear in text."""
        from tokenizers import AddedToken

        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [t for t in self.special_tokens.values() if t and t not in added]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_bos).ids)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece ``.model`` (Llama 1/2, llama2.c). Control pieces written in the text
    (``<s>``, ``</s>``) are tokens, as in transformers; a piece of text after one gets no
    SentencePiece dummy-prefix space, nor does text that starts with a space (transformers'
    Metaspace ``prepend_scheme="first"``)."""

    kind = "sentencepiece"

    def __init__(self, path: Path, config: dict[str, Any] | None = None, **kwargs) -> None:
        super().__init__(path, config, **kwargs)
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        for key, idx in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", sp.unk_id())):
            if self.special_tokens.get(key) is None and idx is not None and idx >= 0:
                self.special_tokens[key] = sp.id_to_piece(idx)
        self._specials = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                          if sp.is_control(i) or sp.is_unknown(i)}
        self._specials = {k: v for k, v in self._specials.items() if k}
        self._want_bos = bool(self.tokenizer_config.get("add_bos_token", True))
        self._want_eos = bool(self.tokenizer_config.get("add_eos_token", False))
        self._sentinel = self._pick_sentinel()

    def _pick_sentinel(self) -> tuple[str, int]:
        """Text put before a piece to encode it without the dummy prefix, and how many ids it
        makes: a newline when it is byte-fallback (no piece spans it, so nothing merges across
        it), else transformers' ``unk_token`` trick."""
        sp = self._sp
        if sp.decode(sp.encode("\n")) == "\n" and not any("\n" in sp.id_to_piece(i) for i in range(self.vocab_size)):
            return "\n", len(sp.encode("\n"))
        unk = self.special_tokens.get("unk_token") or "<unk>"
        return unk, len(sp.encode(unk))

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start and not text.startswith(" "):
            return list(self._sp.encode(text))
        sentinel, n = self._sentinel
        return list(self._sp.encode(sentinel + text))[n:]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = []
        pos = 0
        for start, token in _find_specials(text, self._specials):
            ids += self._encode_plain(text[pos:start], at_start=pos == 0)
            ids.append(self._specials[token])
            pos = start + len(token)
        ids += self._encode_plain(text[pos:], at_start=pos == 0)
        if add_bos and self._want_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_bos and self._want_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(ids)


def _find_specials(text: str, specials: dict[str, int]):
    """(position, token) of each special token in ``text``, left to right, longest first."""
    if not specials:
        return
    import re

    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    for m in pattern.finditer(text):
        yield m.start(), m.group(0)


def load_tokenizer(path, *, chat_template: str | None = None) -> Tokenizer | None:
    """A tokenizer from a file (tokenizer.json / *.model) or a folder holding one; None if the folder has none.

    The files beside it (tokenizer_config.json, special_tokens_map.json, generation_config.json,
    chat_template.jinja) decide BOS/EOS and the chat template; ``chat_template`` (text)
    replaces the folder's template.
    """
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, chat_template=chat_template)
        return None
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path} (expected tokenizer.json, a SentencePiece .model "
                             "or a folder holding one)")
    folder = path.parent
    config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    kwargs = dict(generation=_read_json(folder / "generation_config.json"),
                  chat_template=chat_template if chat_template is not None else find_chat_template(folder, config))
    if path.suffix == ".json":
        return HFTokenizer(path, config, **kwargs)
    return SentencePieceTokenizer(path, config, **kwargs)


def open_tokenizer(default, tokenizer=None, chat_template_file=None) -> Tokenizer | None:
    """The tokenizer a command uses: ``tokenizer`` (a folder or file, ``--tokenizer``) else the one at
    ``default`` (next to the artifact); ``chat_template_file`` (``--chat-template``) replaces its template."""
    template = read_chat_template_file(chat_template_file) if chat_template_file is not None else None
    tok = load_tokenizer(tokenizer if tokenizer is not None else default, chat_template=template)
    if tok is None and tokenizer is not None:
        raise TokenizerError(f"{tokenizer} holds no tokenizer.json nor tokenizer.model")
    if tok is None and template is not None:
        raise TokenizerError("--chat-template needs a tokenizer: none is next to the artifact; pass --tokenizer DIR")
    return tok


def continuation_gap(tok: Tokenizer, prompt_ids, first_id: int) -> str:
    """Text (a space, usually) the first generated token carries after the prompt but loses when
    decoded alone (SentencePiece strips a leading space): what goes between an echoed prompt and
    the continuation."""
    context = [int(i) for i in list(prompt_ids)[-4:]]
    before, joined, alone = tok.decode(context), tok.decode([*context, int(first_id)]), tok.decode([int(first_id)])
    if joined.startswith(before) and joined.endswith(alone):
        return joined[len(before):len(joined) - len(alone)]
    return ""


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
           "continuation_gap", "find_chat_template", "load_tokenizer", "open_tokenizer", "read_chat_template_file",
           "render_chat_template"]
