"""Shared, session-scoped artifacts for the runtime tests: one ONNX export of stories260K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def stories_export(stories260k, tmp_path_factory) -> Path:
    from llama_trt.exporter import export

    out = tmp_path_factory.mktemp("rt") / "stories_onnx"
    export(stories260k, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def ort_session(stories_export):
    from llama_trt.runtime import open_session

    return open_session(stories_export, "onnxruntime")


@pytest.fixture(scope="session")
def torch_session(stories260k):
    from llama_trt.runtime import open_session

    return open_session(stories260k, "torch")


@pytest.fixture(scope="session")
def word_tokenizer_json(tmp_path_factory) -> Path:
    """A WordLevel tokenizer.json over stories260K's 512 ids: "<unk>", "<s>", "</s>", then w3..w511."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    folder = tmp_path_factory.mktemp("tok")
    path = folder / "tokenizer.json"
    tok.save(str(path))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    }))
    return path
