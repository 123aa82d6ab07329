"""SmolLM2-135M-Instruct end to end: `run --chat`, `run` on plain text, `chat` and `serve` + the
official openai client on the fp32 export give transformers' greedy tokens for the same
conversation; an export of the GGUF file chats with no option at all."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llama_trt.cli import main

SYSTEM = "You are a concise assistant."
QUESTION = "What is the capital of France?"
NEW_TOKENS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_export(smollm2_fp32_export):
    return smollm2_fp32_export


@pytest.fixture(scope="module")
def transformers_greedy(smollm2_hf):
    """ids -> transformers' greedy continuation (generated ids only), on the reference folder."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()

    def greedy(ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    return greedy


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


def _chat_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _run(*args) -> dict:
    r = CliRunner().invoke(main, ["run", *map(str, args), "--max-new-tokens", str(NEW_TOKENS), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_run_chat_equals_transformers_greedy(smollm2_export, transformers_greedy, hf_tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    want_prompt = _chat_ids(hf_tokenizer, messages)
    want = transformers_greedy(want_prompt)
    out = _run(smollm2_export, "--prompt", QUESTION, "--chat", *(["--system", system] if system else []))
    assert out["prompt_ids"] == want_prompt
    assert out["token_ids"] == want, (hf_tokenizer.decode(out["token_ids"]), hf_tokenizer.decode(want))
    assert "Paris" in out["text"]


def test_run_plain_prompt_equals_transformers_greedy(smollm2_export, transformers_greedy, hf_tokenizer):
    prompt = "The three primary colors are"
    want_prompt = hf_tokenizer(prompt)["input_ids"]
    out = _run(smollm2_export, "--prompt", prompt)
    assert out["prompt_ids"] == want_prompt  # no BOS that transformers does not add
    assert out["token_ids"] == transformers_greedy(want_prompt)
    r = CliRunner().invoke(main, ["run", str(smollm2_export), "--prompt", prompt, "--max-new-tokens", "8"])
    assert r.stdout.startswith(prompt + " ")  # the prompt, then the continuation


def test_chat_command_two_turns_equal_transformers(smollm2_export, transformers_greedy, hf_tokenizer):
    second = "And of Germany?"
    r = CliRunner().invoke(main, ["chat", str(smollm2_export), "--max-new-tokens", str(NEW_TOKENS)],
                           input=f"{QUESTION}\n{second}\n/exit\n")
    assert r.exit_code == 0, r.output
    messages = [{"role": "user", "content": QUESTION}]
    reply1 = hf_tokenizer.decode(transformers_greedy(_chat_ids(hf_tokenizer, messages)), skip_special_tokens=True)
    messages += [{"role": "assistant", "content": reply1}, {"role": "user", "content": second}]
    reply2 = hf_tokenizer.decode(transformers_greedy(_chat_ids(hf_tokenizer, messages)), skip_special_tokens=True)
    assert r.stdout == f"{reply1}\n{reply2}\n"


def test_serve_openai_client_gives_transformers_text(smollm2_export, transformers_greedy, hf_tokenizer):
    openai = pytest.importorskip("openai")
    from llama_trt.serve.app import create_app
    from llama_trt.serve.server import BackgroundServer, build_engine
    from llama_trt.serve.settings import ServeSettings

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    want = hf_tokenizer.decode(transformers_greedy(_chat_ids(hf_tokenizer, messages)), skip_special_tokens=True)
    engine = build_engine(smollm2_export, backend="onnxruntime", model_name="smol")
    with BackgroundServer(create_app(engine, ServeSettings())) as server, \
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        assert r.choices[0].message.content == want
        stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=NEW_TOKENS,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    engine.close()


def test_gguf_export_chats_without_options(smollm2_gguf, tmp_path, transformers_greedy, hf_tokenizer):
    out = tmp_path / "gguf-export"
    r = CliRunner().invoke(main, ["export", str(smollm2_gguf), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert {"chat_template.jinja", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    messages = [{"role": "user", "content": QUESTION}]
    got = _run(out, "--prompt", QUESTION, "--chat")
    assert got["prompt_ids"] == _chat_ids(hf_tokenizer, messages)
    assert got["token_ids"] == transformers_greedy(got["prompt_ids"])
