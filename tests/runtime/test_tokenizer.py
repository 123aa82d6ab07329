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


def test_template_features_render_like_transformers(word_tokenizer_json, tmp_path):
    """{% generation %}, tojson (no HTML escaping, options), loop controls, strftime_now, extra
    variables: rendered by transformers' apply_chat_template on the same folder as the reference."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
                "{% else %}{{ m | tojson(indent=1, sort_keys=True) }}{% endif %}{% endfor %}"
                "{{ tools | tojson }}{{ strftime_now('%Y') | length }}{{ eos_token }}")
    messages = [{"role": "user", "content": "<b>&'\"日本</b>"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "w5"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "<x>"}}]
    hf = AutoTokenizer.from_pretrained(word_tokenizer_json.parent)
    want = hf.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False)
    tok = load_tokenizer(word_tokenizer_json, chat_template=template)
    assert tok.apply_chat_template(messages, add_generation_prompt=False, tools=tools) == want


def test_template_sources_and_their_errors(word_tokenizer_json, tmp_path):
    from llama_trt.runtime.tokenizer import find_chat_template, open_tokenizer

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(word_tokenizer_json.read_bytes())
    named = [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    with pytest.raises(TokenizerError, match="none named 'default'.*--chat-template"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").write_text("J")  # the file wins over tokenizer_config.json, as in transformers
    assert load_tokenizer(folder).chat_template == "J"
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "L"}))
    assert find_chat_template(folder, {}) == "L"
    override = tmp_path / "mine.jinja"
    override.write_text("M")
    assert open_tokenizer(folder, chat_template_file=override).chat_template == "M"
    with pytest.raises(TokenizerError, match="chat template not found"):
        open_tokenizer(folder, chat_template_file=tmp_path / "missing.jinja")
    with pytest.raises(TokenizerError, match="needs a tokenizer"):
        open_tokenizer(None, chat_template_file=override)
