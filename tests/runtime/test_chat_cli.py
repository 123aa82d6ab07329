"""`llama-trt chat`: multi-turn over stdin, streamed replies, history trimmed to the context with a
notice, /reset and /exit. The reference for each reply is `generate` on the very prompt the chat
template gives for the whole history (rendered by jinja2 here, independently of the runtime)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A word-level tokenizer over stories260K's ids whose chat markers are words of its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 500)},
             "[system]": 500, "[user]": 501, "[assistant]": 502}
    vocab.update({f"w{i}": i for i in range(503, 512)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.WordPiece(prefix="##")
    folder = tmp_path_factory.mktemp("chat_tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def reference_reply(session, folder, messages, max_new_tokens):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    from llama_trt.runtime import GenerationConfig, generate

    text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    out = generate(session, ids, GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True))
    return tok.decode(out.token_ids), len(ids)


def chat(export, folder, stdin, *extra):
    args = ["chat", str(export), "--tokenizer", str(folder), "--max-new-tokens", "4", "--backend", "onnxruntime", *extra]
    return CliRunner().invoke(main, args, input=stdin)


def test_chat_is_multi_turn_and_streams_what_generate_gives(stories_export, chat_tokenizer, ort_session):
    r = chat(stories_export, chat_tokenizer, "w5 w6\nw7\n/exit\nw8\n", "--system", "w9")
    assert r.exit_code == 0, r.output
    replies = r.stdout.splitlines()
    assert len(replies) == 2  # /exit stops before w8
    history = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6"}]
    want1, _ = reference_reply(ort_session, chat_tokenizer, history, 4)
    history += [{"role": "assistant", "content": want1}, {"role": "user", "content": "w7"}]
    want2, _ = reference_reply(ort_session, chat_tokenizer, history, 4)
    assert replies == [want1, want2]


def test_reset_forgets_the_history(stories_export, chat_tokenizer, ort_session):
    r = chat(stories_export, chat_tokenizer, "w5 w6\n/reset\nw7\n")  # end of input quits too
    assert r.exit_code == 0, r.output
    assert "(history cleared)" in r.stderr
    want, _ = reference_reply(ort_session, chat_tokenizer, [{"role": "user", "content": "w7"}], 4)
    assert r.stdout.splitlines()[1] == want


def test_history_is_trimmed_to_the_context_with_a_notice(stories_export, chat_tokenizer, ort_session):
    context = ort_session.max_context
    long_message = " ".join(f"w{3 + i % 400}" for i in range(context // 3))  # two of them fit, three do not
    r = chat(stories_export, chat_tokenizer, f"{long_message}\n{long_message}\n{long_message}\n")
    assert r.exit_code == 0, r.output
    assert "dropped the 2 oldest messages" in r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 3
    # the third reply saw only the second exchange and the third message
    history = [{"role": "user", "content": long_message}, {"role": "assistant", "content": replies[1]},
               {"role": "user", "content": long_message}]
    want, n = reference_reply(ort_session, chat_tokenizer, history, 4)
    assert n + 4 <= context and replies[2] == want


def test_too_long_message_is_an_error_line_and_the_chat_goes_on(stories_export, chat_tokenizer):
    too_long = " ".join(["w5"] * 2000)
    r = chat(stories_export, chat_tokenizer, f"{too_long}\nw7\n")
    assert r.exit_code == 0, r.output
    assert "error: the message needs" in r.stderr and len(r.stdout.splitlines()) == 1


def test_chat_needs_a_template(stories_export, word_tokenizer_json, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(word_tokenizer_json.read_bytes())
    r = CliRunner().invoke(main, ["chat", str(stories_export), "--tokenizer", str(folder)], input="w5\n")
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and "--chat-template" in r.output
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(TEMPLATE.replace("[assistant]", "w3"))
    r = CliRunner().invoke(main, ["chat", str(stories_export), "--tokenizer", str(folder), "--chat-template",
                                  str(tmpl), "--max-new-tokens", "2"], input="w5\n")
    assert r.exit_code == 0, r.output
