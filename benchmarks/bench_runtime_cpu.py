"""Runtime on CPU, side by side: our ONNX Runtime session vs torch eager vs onnxruntime-genai.

Same ~125M-parameter random LLaMA (hidden 768, 12 layers, 12 heads / 4 KV heads, intermediate
2048, vocab 32000) for every contender; batch 1, greedy, fixed random prompt, EOS ignored.
Contenders alternate within each round (machines are noisy) and medians are reported.

onnxruntime-genai is used when importable, with its own model builder
(``python -m onnxruntime_genai.models.builder -m CKPT -o OUT -p fp32 -e cpu``). The builder
insists on a tokenizer it can load with ``AutoTokenizer``: the checkpoint folder gets a small
WordLevel ``tokenizer.json`` + ``tokenizer_config.json`` (built here with ``tokenizers``).

``llama_trt_onnxruntime`` is the default ``OrtSession`` (``fused_ops=True`` on CPU: the
session-time rewrite to ORT's fused kernels); ``llama_trt_onnxruntime_unfused`` runs the
exported graph as is (``fused_ops=False``), for a before/after in the same run.

Prints one JSON object. Usage:
    python benchmarks/bench_runtime_cpu.py [--prompt-len 32] [--new-tokens 32] [--rounds 5] [--nospin] [--busy N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def bench_config():
    from llama_trt.config import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                       num_kv_heads=4, max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1,
                       eos_token_id=(2,))


def tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """A WordLevel tokenizer covering the whole vocabulary (what the genai builder needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.WordPiece(prefix="##")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 2048}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(cfg).encode()}


def prepare(work: Path, log) -> dict[str, Path | None]:
    from llama_trt.checkpoint import random_state_dict, save_hf_checkpoint

    config = bench_config()
    ckpt, ours, genai = work / "ckpt", work / "ours_onnx", work / "genai_onnx"
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        save_hf_checkpoint(config, random_state_dict(config, seed=0, std=0.02), ckpt, overwrite=True,
                           extra_files=tokenizer_files(config.vocab_size))
        log(f"checkpoint written in {time.perf_counter() - t:.0f} s")
    if not (ours / "manifest.json").is_file():
        from llama_trt.exporter import export

        t = time.perf_counter()
        export(ckpt, ours, dtype="fp32", force=True)
        log(f"our export in {time.perf_counter() - t:.0f} s")
    genai_note = None
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        genai, genai_note = None, "onnxruntime_genai not importable: skipped"
    if genai is not None and not (genai / "genai_config.json").is_file():
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-o", str(genai),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "genai_cache")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (genai / "genai_config.json").is_file():
            genai_note = "genai builder failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
            genai = None
        else:
            log(f"genai build in {time.perf_counter() - t:.0f} s")
    return {"config": config, "ckpt": ckpt, "ours": ours, "genai": genai, "genai_note": genai_note}


class Ours:
    name = "llama_trt_onnxruntime"

    def __init__(self, path, backend, **options):
        from llama_trt.runtime import open_session

        self.session = open_session(path, backend, **options)
        self.name = "llama_trt_onnxruntime" if backend == "onnxruntime" else "torch_eager"
        if options.get("fused_ops") is False:
            self.name += "_unfused"
        if options.get("allow_spinning") is False:
            self.name += "_nospin"

    def run(self, prompt, new_tokens):
        from llama_trt.runtime import GenerationConfig, generate

        r = generate(self.session, prompt, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        return r.prefill_ms, r.decode_tokens_per_s, r.token_ids


class Genai:
    name = "onnxruntime_genai"

    def __init__(self, path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(path))

    def run(self, prompt, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        gen.generate_next_token() if hasattr(gen, "generate_next_token") else None
        ids = [int(gen.get_next_tokens()[0])]
        ttft = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        while len(ids) < new_tokens and not gen.is_done():
            gen.generate_next_token()
            ids.append(int(gen.get_next_tokens()[0]))
        rate = (len(ids) - 1) / (time.perf_counter() - t1)
        return ttft, rate, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "llama_trt_bench_cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-unfused", action="store_true",
                    help="skip the extra contender OrtSession(fused_ops=False) (the export's graph as is)")
    ap.add_argument("--nospin", action="store_true",
                    help="add OrtSession(allow_spinning=False): ORT workers sleep instead of spinning (shared CPUs)")
    ap.add_argument("--busy", type=int, default=0,
                    help="run N busy-loop processes during the rounds (a loaded, shared machine)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    prep = prepare(args.workdir, log)
    config = prep["config"]
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, size=args.prompt_len).tolist()
    contenders = [Ours(prep["ours"], "onnxruntime"), Ours(prep["ckpt"], "torch")]
    if not args.no_unfused:
        contenders.append(Ours(prep["ours"], "onnxruntime", fused_ops=False))
    if args.nospin:
        contenders.append(Ours(prep["ours"], "onnxruntime", allow_spinning=False))
    if prep["genai"] is not None:
        contenders.append(Genai(prep["genai"]))
    results = {c.name: {"ttft_ms": [], "decode_tokens_per_s": [], "token_ids": None} for c in contenders}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for c in contenders:  # warm-up
            c.run(prompt, 4)
        for rnd in range(args.rounds):
            order = contenders if rnd % 2 == 0 else contenders[::-1]
            for c in order:
                ttft, rate, ids = c.run(prompt, args.new_tokens)
                results[c.name]["ttft_ms"].append(round(ttft, 2))
                results[c.name]["decode_tokens_per_s"].append(round(rate, 2))
                results[c.name]["token_ids"] = ids
            log(f"round {rnd + 1}/{args.rounds} done")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    summary = {}
    ref_ids = results["torch_eager"]["token_ids"]
    for name, r in results.items():
        summary[name] = {
            "ttft_ms_median": statistics.median(r["ttft_ms"]),
            "decode_tokens_per_s_median": statistics.median(r["decode_tokens_per_s"]),
            "ttft_ms": r["ttft_ms"], "decode_tokens_per_s": r["decode_tokens_per_s"],
            "greedy_ids_equal_torch": r["token_ids"] == ref_ids,
        }
    ours = summary["llama_trt_onnxruntime"]["decode_tokens_per_s_median"]
    ratios = {"ours_vs_torch_eager": ours / summary["torch_eager"]["decode_tokens_per_s_median"]}
    if "onnxruntime_genai" in summary:
        ratios["ours_vs_onnxruntime_genai"] = ours / summary["onnxruntime_genai"]["decode_tokens_per_s_median"]
    if "llama_trt_onnxruntime_unfused" in summary:
        unfused = summary["llama_trt_onnxruntime_unfused"]["decode_tokens_per_s_median"]
        ratios["ours_vs_ours_unfused"] = ours / unfused
        if "onnxruntime_genai" in summary:
            ratios["ours_unfused_vs_onnxruntime_genai"] = (
                unfused / summary["onnxruntime_genai"]["decode_tokens_per_s_median"])
    if "llama_trt_onnxruntime_nospin" in summary and "onnxruntime_genai" in summary:
        ratios["ours_nospin_vs_onnxruntime_genai"] = (summary["llama_trt_onnxruntime_nospin"]
                                                      ["decode_tokens_per_s_median"]
                                                      / summary["onnxruntime_genai"]["decode_tokens_per_s_median"])
    targets = {"ours >= 1.5x torch eager": ratios["ours_vs_torch_eager"] >= 1.5}
    if "ours_vs_onnxruntime_genai" in ratios:
        targets["ours within 10% of onnxruntime-genai"] = ratios["ours_vs_onnxruntime_genai"] >= 0.9
    import onnxruntime
    import torch

    out = {
        "benchmark": "runtime_cpu", "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "model": {**{k: getattr(config, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                      "intermediate_size", "vocab_size")},
                  "parameters": config.num_parameters(), "dtype": "fp32"},
        "settings": {"batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "greedy": True, "busy_processes": args.busy},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "onnxruntime_genai": getattr(sys.modules.get("onnxruntime_genai"), "__version__", None)},
        "ours_session": contenders[0].session.describe(),
        "results": summary, "ratios": ratios, "targets_met": targets, "genai_note": prep["genai_note"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
