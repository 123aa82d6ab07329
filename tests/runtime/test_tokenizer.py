"""Tokenizers: SentencePiece vs the library, tokenizer.json, chat templates, streaming detokenisation."""

from __future__ import annotations

import json

import pytest

from llama_trt.runtime import StreamDecoder, TokenizerError, load_tokenizer
from llama_trt.runtime.tokenizer import render_chat_template

TEXTS = ["Hello world", "  leading spaces and   runs", "Ünïcödé 日本語 😀 mixed", "line\nbreak\ttab", "x"]


def test_sentencepiece_round_trip_matches_library(llama2_tokenizer_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
    tok = load_tokenizer(llama2_tokenizer_model)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    for text in TEXTS:
        ids = tok.encode(text)
        if not text.startswith(" "):  # a leading space gets no dummy prefix (transformers; see the parity tests)
            assert ids == [1, *sp.encode(text)]
            assert tok.encode(text, add_bos=False) == sp.encode(text)
            assert tok.decode(ids) == sp.decode(sp.encode(text))


def test_sentencepiece_stream_decoder_concatenates_to_full_text(llama2_tokenizer_model):
    tok = load_tokenizer(llama2_tokenizer_model)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        dec = StreamDecoder(tok)
        chunks = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)  # partial UTF-8 is held back, never emitted
    # the emoji is split over byte-fallback tokens: nothing comes out until it is complete
    ids = tok.encode("😀", add_bos=False)
    dec = StreamDecoder(tok)
    assert len(ids) > 1 and [dec.push(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_tokenizer_json_round_trip(word_tokenizer_json):
    tok = load_tokenizer(word_tokenizer_json.parent)
    assert tok.kind == "tokenizers" and tok.bos_id == 1 and tok.eos_id == 2 and tok.vocab_size == 512
    ids = tok.encode("w5 w400 w7")
    assert ids == [1, 5, 400, 7]
    assert tok.encode("w5 w400 w7", add_bos=False) == [5, 400, 7]
    assert tok.decode(ids) == "w5 w400 w7"
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in [5, 400, 7]) + dec.flush() == "w5 w400 w7"


def test_chat_template_renders_like_jinja2(word_tokenizer_json):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok = load_tokenizer(word_tokenizer_json)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w5 w6"}]
    template = json.loads((word_tokenizer_json.parent / "tokenizer_config.json").read_text())["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>")
    got = tok.apply_chat_template(messages)
    assert got == want == "<s>[system] be brief\n[user] w5 w6\n[assistant]"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("w5 w6\n")


def test_chat_template_errors_are_clear(llama2_tokenizer_model):
    tok = load_tokenizer(llama2_tokenizer_model)  # no tokenizer_config.json: no template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="only user"):
        render_chat_template("{{ raise_exception('only user') }}", [])


def test_no_tokenizer_means_ids(tmp_path):
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
