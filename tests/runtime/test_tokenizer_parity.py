"""Our token ids == transformers' for plain text (``tokenizer(text)``) and chats
(``apply_chat_template(..., tokenize=True)``), on SmolLM2 and on a Llama-3-style and a Llama-2
SentencePiece tokenizer built here. transformers is the reference throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_trt.runtime import load_tokenizer

SYSTEM = "You are a terse assistant. Answer in one sentence."
USER = ["What is the capital of France?", "  Why is the sky blue?\n", "Ünïcödé: 日本語 😀 — ok?",
        "Write `print(1)` in Python.", "tabs\tand\nnewlines\n\nhere", "1+1=?", "Tell me a joke about cats.",
        "a" * 40, "Résumé, naïve, café.", "<b>html</b> & entities"]
ASSISTANT = ["Paris.", " Rayleigh scattering.", "Fine, merci!", "print(1)", "Done.\n"]

PLAIN = ["Hello world", "Once upon a time", " leading space", "  two leading spaces", "trailing space ",
         "line\nbreak\ttab", "Ünïcödé 日本語 😀 mixed", "x", "The quick brown fox jumps over the lazy dog.",
         "numbers 1234567890 and 3.14159", "code: def f(x): return x**2", "multiple   inner   spaces",
         "\n\nleading newlines", "emoji only 🎉🎉", "QUOTES \"double\" and 'single'", "a, b; c: d!",
         "Ελληνικά και русский", "CamelCaseWordsHere", "end with newline\n", "mixed\r\nCRLF"]


def conversations() -> list[tuple[list[dict], bool]]:
    """20 (messages, add_generation_prompt): system prompt or not, 1-3 turns, open or closed."""
    convs = []
    for i in range(20):
        turns = 1 + i % 3
        msgs = [{"role": "system", "content": SYSTEM}] if i % 2 == 0 else []
        for t in range(turns):
            msgs.append({"role": "user", "content": USER[(i + t) % len(USER)]})
            if t < turns - 1 or i % 4 == 3:  # every 4th conversation ends with the assistant's reply
                msgs.append({"role": "assistant", "content": ASSISTANT[(i + t) % len(ASSISTANT)]})
        convs.append((msgs, msgs[-1]["role"] == "user"))
    return convs


def _hf_chat_ids(hf, messages, add_generation_prompt) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_parity(folder: Path, *, hf_folder: Path | None = None) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_folder or folder)
    ours = load_tokenizer(folder)
    for text in PLAIN:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"], text
    for messages, agp in conversations():
        assert ours.encode_chat(messages, add_generation_prompt=agp) == _hf_chat_ids(hf, messages, agp), messages
        assert ours.apply_chat_template(messages, agp) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=agp)


# ---------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_ids_match_transformers(smollm2_hf):
    assert_parity(smollm2_hf)
    tok = load_tokenizer(smollm2_hf)
    assert tok.encode("Hello")[0] != tok.bos_id  # SmolLM2 adds no BOS to plain text (the old bug)


@pytest.mark.slow
def test_smollm2_eos_and_template_source(smollm2_hf):
    from transformers import AutoTokenizer, GenerationConfig

    tok = load_tokenizer(smollm2_hf)
    hf = AutoTokenizer.from_pretrained(smollm2_hf)
    gen = GenerationConfig.from_pretrained(smollm2_hf)
    want = {hf.eos_token_id} | set([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    assert set(tok.eos_ids) == want
    assert tok.chat_template == (smollm2_hf / "chat_template.jinja").read_text()


# ---------------------------------------------------------------------------------- Llama 3 style

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_llama3_style(folder: Path, *, template_in: str = "jinja", tokenizer_config: dict | None = None) -> Path:
    """Byte-level BPE (trained here) + Llama 3's special tokens and BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(USER + ASSISTANT + PLAIN + [SYSTEM] * 3, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "tokenizer_class": "PreTrainedTokenizerFast", **(tokenizer_config or {})}
    if template_in == "jinja":
        (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    elif template_in == "config":
        config["chat_template"] = LLAMA3_TEMPLATE
    elif template_in == "named":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                   {"name": "default", "template": LLAMA3_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return folder


@pytest.mark.parametrize("template_in", ["jinja", "config", "named"])
def test_llama3_style_ids_match_transformers(tmp_path, template_in):
    folder = build_llama3_style(tmp_path / "l3", template_in=template_in)
    assert_parity(folder)
    tok = load_tokenizer(folder)
    assert tok.encode("hi")[0] == tok.bos_id  # the post-processor adds <|begin_of_text|>
    assert set(tok.eos_ids) == {tok.eos_id, load_tokenizer(folder)._tok.token_to_id("<|end_of_text|>")}


def test_tokenizer_json_post_processor_decides_bos(tmp_path):
    """transformers 5: with a tokenizer.json, its post-processor adds BOS/EOS and
    tokenizer_config.json's add_bos_token / add_eos_token are ignored; no post-processor: nothing."""
    flagged = build_llama3_style(tmp_path / "flags", tokenizer_config={"add_bos_token": False, "add_eos_token": True})
    assert_parity(flagged)
    assert load_tokenizer(flagged).encode("hi")[0] == load_tokenizer(flagged).bos_id
    bare = build_llama3_style(tmp_path / "bare", tokenizer_config={"add_bos_token": True})
    data = json.loads((bare / "tokenizer.json").read_text())
    data["post_processor"] = None
    (bare / "tokenizer.json").write_text(json.dumps(data))
    assert_parity(bare)
    assert load_tokenizer(bare).encode("hi")[0] != load_tokenizer(bare).bos_id


def test_chat_template_file_option_replaces_the_folders(tmp_path):
    from transformers import AutoTokenizer

    folder = build_llama3_style(tmp_path / "l3")
    other = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(folder, chat_template=other)
    hf = AutoTokenizer.from_pretrained(folder)
    for messages, agp in conversations():
        want = hf.apply_chat_template(messages, chat_template=other, tokenize=True, add_generation_prompt=agp)
        assert tok.encode_chat(messages, agp) == list(want["input_ids"])


# ---------------------------------------------------------------------------------- Llama 2 (SentencePiece)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_llama2(folder: Path, model: Path) -> Path:
    """Llama 2's SentencePiece model as transformers' LlamaTokenizer (BPE merges ordered by the
    pieces' scores, add_bos_token) saved with save_pretrained, plus Llama 2's chat template."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())})
    hf = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    hf.chat_template = LLAMA2_TEMPLATE
    hf.save_pretrained(folder)
    return folder


def test_llama2_tokenizer_json_ids_match_transformers(tmp_path, llama2_tokenizer_model):
    folder = build_llama2(tmp_path / "l2", llama2_tokenizer_model)
    assert_parity(folder)
    assert load_tokenizer(folder).encode("Hello")[0] == 1


def test_llama2_sentencepiece_model_ids_match_transformers(tmp_path, llama2_tokenizer_model):
    """A folder with only tokenizer.model (+ config): sentencepiece, special tokens split like transformers."""
    hf_folder = build_llama2(tmp_path / "l2", llama2_tokenizer_model)
    sp_folder = tmp_path / "sp"
    sp_folder.mkdir()
    (sp_folder / "tokenizer.model").write_bytes(llama2_tokenizer_model.read_bytes())
    (sp_folder / "tokenizer_config.json").write_text((hf_folder / "tokenizer_config.json").read_text())
    (sp_folder / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    assert load_tokenizer(sp_folder).kind == "sentencepiece"
    assert_parity(sp_folder, hf_folder=hf_folder)
