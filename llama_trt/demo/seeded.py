"""The seeded demo (``llama-trt demo --size tiny|small``): the whole pipeline, no download.

A small seeded LLaMA with GQA and a BPE tokenizer trained on a built-in text (so text goes in
and out): export fp32 / fp16 / int8, validate each against torch, build TensorRT engines where
installed, generate and bench. Its weights are random, so its text is meaningless: it is a quick
check of the pipeline, not a language model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import LlamaTrtError
from .stages import bench_all, build_engines, export_all, export_rows, validate_all
from .summary import DemoSummary

# Built-in training text for the demo tokenizer (public-domain style prose, written here).
CORPUS = """\
Once upon a time there was a little engine that lived beside a long railway.
Every morning the engine pulled a train of cars over the hill to the town.
The children waved, the birds sang, and the engine said: I think I can.
One day the hill was steep and the cars were heavy, but the engine tried again.
It puffed and it pulled, and at last it reached the top of the hill.
Numbers are fine too: 1, 2, 3, 10, 100, 2048, 4096 tokens per second.
A model reads tokens, remembers keys and values, and writes the next token.
"""

SIZES = {
    # GQA everywhere: 8 query heads share 2 KV heads (small: 4 query heads / 2 KV heads).
    "tiny": dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2),
    "small": dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=8, num_kv_heads=2),
}


def train_tokenizer(folder: Path, vocab_size: int) -> int:
    """A BPE over :data:`CORPUS` (Metaspace, so every piece decodes to readable text);
    writes tokenizer.json + tokenizer_config.json.

    Ids 0-3 are <pad>, <s> (BOS), </s> (EOS), <unk>, as the model config says.
    Returns the real vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}"),
    }, indent=2))
    return tok.get_vocab_size()


def make_demo_checkpoint(folder: Path, size: str = "small", seed: int = 0) -> Path:
    from ..checkpoint import random_state_dict, save_hf_checkpoint, tiny_config

    if size not in SIZES:
        raise LlamaTrtError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    staging = folder.parent / f".{folder.name}.tok"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        vocab = train_tokenizer(staging, vocab_size=512)
        config = tiny_config(vocab_size=vocab, max_position_embeddings=256, **SIZES[size])
        extra = {n: (staging / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
        save_hf_checkpoint(config, random_state_dict(config, seed=seed), folder, overwrite=True, extra_files=extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


SEEDED_NOTE = ("the seeded model has random weights: its text is meaningless by design; it shows the "
               "pipeline, not a language model (the default demo runs SmolLM2-135M-Instruct)")
# Random weights give near-tied logits, so int8 rounding flips more argmaxes than on a trained
# model (trained SmolLM2: 96.9% same top-1); the seeded demo gates int8's top-1 at 90%.
SEEDED_TOLERANCES = {"onnx-int8": {"top1": 0.90}}


def run_seeded(out: Path, *, size: str, console, stage, started: float, steps: int = 16,
               new_tokens: int = 24, prompt: str = "Once upon a time", engines: bool = True) -> DemoSummary:
    from ..runtime.generate import GenerationConfig, generate
    from ..runtime.sessions import open_session
    from ..runtime.tokenizer import load_tokenizer

    notes: list[str] = [SEEDED_NOTE]
    stage("1/6 seeded LLaMA (GQA) + BPE tokenizer trained on built-in text")
    ckpt = make_demo_checkpoint(out / "checkpoint", size=size)
    plans = {"onnx-fp32": dict(dtype="fp32"), "onnx-fp16": dict(dtype="fp16"),
             "onnx-int8": dict(dtype="fp32", quantize="int8-weight", certify=False)}
    exports = export_all(ckpt, out, plans, lambda m: stage(f"2/6 {m}"))
    reports = validate_all(exports, ckpt, out, lambda m: stage(f"3/6 {m}"), console, steps=steps,
                           tolerances=SEEDED_TOLERANCES)
    stage("4/6 TensorRT engines")
    engine_rows = build_engines(out, {k: exports[k] for k in ("onnx-fp16", "onnx-int8")}, console, notes,
                                max_seq=128, max_context=256) if engines else []
    stage("5/6 generate text through the runtime (ONNX Runtime, fp32 export)")
    tokenizer = load_tokenizer(exports["onnx-fp32"])
    with open_session(exports["onnx-fp32"], "onnxruntime") as session:
        result = generate(session, prompt, GenerationConfig(max_new_tokens=new_tokens), tokenizer)
    console.print(f"prompt: {prompt}")
    console.print(f"continuation (meaningless, random weights): {result.text}")
    stage("6/6 short bench (ONNX Runtime, batch 1)")
    speeds = bench_all(exports, prompt_len=16, new_tokens=16, runs=3)
    rows = export_rows(exports, reports, speeds) + engine_rows
    summary = DemoSummary(str(out), str(ckpt), f"seeded random LLaMA ({size})", tuple(rows), prompt,
                          result.text or "", round(time.perf_counter() - started, 1), tuple(notes))
    return summary
