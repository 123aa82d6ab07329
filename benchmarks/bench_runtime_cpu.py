"""Runtime on CPU, side by side, one contender per process: our ONNX Runtime session (fp32, fp16,
int8-weight, int4-awq g64: each scheme's defaults) vs onnxruntime-genai (fp32, fp16, int8, int4) vs
transformers eager fp32. A contender that fails (genai's fp16 CPU model fails its first decode step
in onnxruntime 1.32) is reported under ``failed`` and dropped from later cycles.

``--model smollm2``: SmolLM2-135M-Instruct (the reference HF folder from the checkpoint zoo).
``--model seeded``: a random ~125M LLaMA (hidden 768, 12 layers, 12 heads / 4 KV heads,
intermediate 2048, vocab 32000) with a WordLevel tokenizer the genai builder accepts.

Every contender lives in its own subprocess (so its peak RSS, ``VmHWM``, is its own: model,
runtime and KV cache) and all run with the same intra-op thread count (``--threads``;
onnxruntime-genai gets it through ``intra_op_num_threads`` in its genai_config.json, which
otherwise defaults to 1 thread here). The parent alternates the contenders within each cycle
(order reversed every other cycle: machines are noisy) and reports medians. It waits ``--settle``
seconds (default 0.3) before each request: ONNX Runtime's worker threads spin for a while after a
run, so a contender asked right after another one shares the cores with those spinning threads
(measured, SmolLM2 int8 at batch 1: TTFT of a 64-token prompt +25 ms for whichever of ours and
genai ran second, 38 -> 66 ms for ours; with the pause 40 ms). Greedy decoding of a
fixed random prompt, EOS ignored; TTFT = prefill + first token; decode tok/s over the rest.

Artifacts are built once under ``--workdir`` (our exports with ``llama-trt export``, genai's
with ``python -m onnxruntime_genai.models.builder``) and reused. Prints one JSON object.

    python benchmarks/bench_runtime_cpu.py --model smollm2 [--cycles 6] [--prompt-len 64]
        [--new-tokens 32] [--batch 1] [--threads N] [--only ours_fp32,genai_fp32]
        [--settings 1x64+32,4x64+32,8x64+32,1x512+8]   (several shapes in one run)

Peak RSS (``VmHWM``) is per contender process over the whole run, so with ``--settings`` it is
that of the largest shape. Each of our exports is opened once before the measured workers start:
an export's first open builds its session graph (``runtime/sessions/ort_cache``) at a higher peak,
reported under ``first_open`` (``graph_cache``: "built" or "read"); the measured workers read it.
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

OURS = {"ours_fp32": ("fp32", None), "ours_fp16": ("fp16", None), "ours_int8_weight": ("fp32", "int8-weight"),
        "ours_int8_weight_headfloat": ("fp32", "int8-weight", "--no-quantize-lm-head"),
        "ours_int8_weight_block32": ("fp32", "int8-weight", "--int8-kernel-block", "32"), "ours_int4": ("fp32", "int4-awq"),
        "ours_int4_head4": ("fp32", "int4-awq", "--quantize-lm-head"),
        "ours_int4_scan8": ("fp32", "int4-awq", "--head-scan-bits", "8")}
GENAI = {"genai_fp32": "fp32", "genai_fp16": "fp16", "genai_int8": "int8", "genai_int4": "int4"}
HF = {"transformers_eager_fp32": "fp32"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- artifacts


def seeded_config():
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


def checkpoint(model: str, work: Path) -> Path:
    if model == "smollm2":
        from llama_trt.checkpoint.zoo import reference_hf_folder

        return reference_hf_folder()
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        from llama_trt.checkpoint import random_state_dict, save_hf_checkpoint

        cfg = seeded_config()
        save_hf_checkpoint(cfg, random_state_dict(cfg, seed=0, std=0.02), ckpt, overwrite=True,
                           extra_files=tokenizer_files(cfg.vocab_size))
    return ckpt


def _run(cmd: list[str]) -> str | None:
    """Run a build step; None when it worked, else its last stderr line."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return None
    return ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1][:300]


def build_ours(name: str, ckpt: Path, work: Path) -> tuple[Path | None, str | None]:
    from llama_trt.quantize.schemes import SCHEME_NAMES as SCHEMES

    dtype, scheme, *flags = OURS[name]
    out = work / name
    if (out / "manifest.json").is_file():
        return out, None
    if scheme is not None and scheme not in SCHEMES:
        return None, f"quantization scheme {scheme!r} is not in this llama-trt ({', '.join(SCHEMES)})"
    cmd = [sys.executable, "-m", "llama_trt.cli", "export", str(ckpt), "-o", str(out), "--dtype", dtype, "--force"]
    if scheme:
        cmd += ["--quantize", scheme, *flags]
    t = time.perf_counter()
    err = _run(cmd)
    log(f"{name}: export {'failed: ' + err if err else f'in {time.perf_counter() - t:.0f} s'}")
    return (None, f"export failed: {err}") if err else (out, None)


def build_genai(name: str, ckpt: Path, work: Path, threads: int) -> tuple[Path | None, str | None]:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None, "onnxruntime_genai is not importable"
    out = work / name
    cfg_file = out / "genai_config.json"
    if not cfg_file.is_file():
        t = time.perf_counter()
        err = _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-o", str(out),
                    "-p", GENAI[name], "-e", "cpu", "-c", str(work / "genai_cache")])
        if err or not cfg_file.is_file():
            return None, f"genai builder failed: {err}"
        log(f"{name}: built in {time.perf_counter() - t:.0f} s")
    cfg = json.loads(cfg_file.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:  # same thread count as ours (genai's default: 1 here)
        opts["intra_op_num_threads"] = threads
        cfg_file.write_text(json.dumps(cfg, indent=4))
    return out, None


# ----------------------------------------------------------------------------- contenders (in workers)


class Ours:
    def __init__(self, path: str, threads: int):
        from llama_trt.runtime import open_session

        self.session = open_session(path, "onnxruntime", threads=threads)

    def run(self, prompts, new_tokens):
        from llama_trt.runtime import GenerationConfig, generate_batch

        rs = generate_batch(self.session, prompts, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        return rs[0].prefill_ms, rs[0].decode_tokens_per_s * len(prompts), [r.token_ids for r in rs]


class Genai:
    def __init__(self, path: str, threads: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(path)

    def run(self, prompts, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompts[0]) + new_tokens, do_sample=False,
                                  batch_size=len(prompts))
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        # append_tokens runs the prompt; the first generate_next_token samples from those logits
        # without a model run (0.05 ms); get_next_tokens() before it returns the prompt's last token.
        # So the first token is part of the TTFT, as it is for the others, and every counted decode
        # token costs one model run (counting the free one inflated genai's decode rate by 31/30).
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        gen.generate_next_token()
        ids = [gen.get_next_tokens().tolist()]
        ttft = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        while len(ids) < new_tokens and not gen.is_done():
            gen.generate_next_token()
            ids.append(gen.get_next_tokens().tolist())
        rate = (len(ids) - 1) * len(prompts) / (time.perf_counter() - t1)
        return ttft, rate, [list(col) for col in zip(*ids)]


class Transformers:
    def __init__(self, path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()

    def run(self, prompts, new_tokens):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor(prompts), use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ttft = (time.perf_counter() - t0) * 1e3
            ids, past = [nxt], out.past_key_values
            t1 = time.perf_counter()
            while len(ids) < new_tokens:
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                ids.append(nxt)
            rate = (len(ids) - 1) * len(prompts) / (time.perf_counter() - t1)
        return ttft, rate, torch.cat(ids, 1).tolist()


KINDS = {"ours": Ours, "genai": Genai, "transformers": Transformers}


def _vm(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, path: str, threads: int) -> None:
    """Serve JSON commands on stdin: {"prompts", "new_tokens"} -> one run; {"stats": 1} -> memory."""
    t = time.perf_counter()
    contender = KINDS[kind](path, threads)
    open_s = time.perf_counter() - t
    rss_open = _vm("VmRSS")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "stats" in cmd:
            graph = getattr(getattr(contender, "session", None), "graph", None)
            cache = {"graph_cache": "read" if graph.from_cache else "built"} if graph is not None else {}
            print(json.dumps({"open_s": open_s, "rss_after_open_mib": rss_open, "peak_rss_mib": _vm("VmHWM"), **cache}),
                  flush=True)
            continue
        try:
            ttft, rate, ids = contender.run(cmd["prompts"], cmd["new_tokens"])
        except Exception as e:  # noqa: BLE001 - reported to the parent, which drops this contender
            print(json.dumps({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}), flush=True)
            continue
        print(json.dumps({"ttft_ms": ttft, "decode_tokens_per_s": rate, "ids": ids}), flush=True)


class Worker:
    def __init__(self, name: str, kind: str, path: Path, threads: int):
        self.name = name
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--path", str(path),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self._read()  # ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker exited with {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:  # a worker that died
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- main


def prepare(args, work: Path) -> tuple[dict[str, tuple[str, Path]], dict[str, str]]:
    ckpt = checkpoint(args.model, work)
    wanted = set(args.only.split(",")) if args.only else set(OURS) | set(GENAI) | set(HF)
    plan, skipped = {}, {}
    for name in OURS:
        if name in wanted:
            path, why = build_ours(name, ckpt, work)
            plan[name] = ("ours", path) if path else None
            skipped.update({name: why} if why else {})
    for name in GENAI:
        if name in wanted:
            path, why = build_genai(name, ckpt, work, args.threads)
            plan[name] = ("genai", path) if path else None
            skipped.update({name: why} if why else {})
    if "transformers_eager_fp32" in wanted:
        plan["transformers_eager_fp32"] = ("transformers", ckpt)
    return {k: v for k, v in plan.items() if v is not None}, skipped


def summarize(samples: dict[str, dict], stats: dict[str, dict], ref: str | None) -> dict[str, dict]:
    out = {}
    for name, s in samples.items():
        out[name] = {
            "decode_tokens_per_s_median": statistics.median(s["decode_tokens_per_s"]),
            "ttft_ms_median": statistics.median(s["ttft_ms"]),
            **stats.get(name, {}),
            "decode_tokens_per_s": [round(x, 2) for x in s["decode_tokens_per_s"]],
            "ttft_ms": [round(x, 2) for x in s["ttft_ms"]],
            **({"greedy_ids_equal_" + ref: s["ids"] == samples[ref]["ids"]} if ref and ref in samples else {}),
        }
    return out


def ratios(summary: dict[str, dict]) -> dict[str, float]:
    """Ratios of the medians, and (``..._decode_paired``) the median and range of the per-cycle
    ratios: within a cycle both contenders ran back to back, so a machine whose speed drifts
    over minutes moves both samples of a pair together."""
    pairs = [("ours_fp32", "genai_fp32"), ("ours_int8_weight", "genai_int8"), ("ours_int8_weight_headfloat", "genai_int8"),
             ("ours_int8_weight_block32", "genai_int8"), ("ours_int8_weight", "ours_int8_weight_block32"),
             ("ours_int4", "genai_int4"), ("ours_int4_head4", "genai_int4"), ("ours_int4_scan8", "genai_int4"),
             ("ours_int4", "ours_int4_scan8"),
             ("ours_fp32", "transformers_eager_fp32")]
    out = {}
    for a, b in pairs:
        if a in summary and b in summary:
            out[f"{a}_vs_{b}_decode"] = (summary[a]["decode_tokens_per_s_median"]
                                         / summary[b]["decode_tokens_per_s_median"])
            out[f"{a}_vs_{b}_ttft"] = summary[a]["ttft_ms_median"] / summary[b]["ttft_ms_median"]
            paired = [x / y for x, y in zip(summary[a]["decode_tokens_per_s"], summary[b]["decode_tokens_per_s"]) if y]
            if paired:
                out[f"{a}_vs_{b}_decode_paired"] = {"median": statistics.median(paired), "min": min(paired),
                                                    "max": max(paired), "ours_ahead": sum(r >= 1 for r in paired),
                                                    "cycles": len(paired)}
    return out


def parse_settings(spec: str) -> list[tuple[int, int, int]]:
    """``"1x64+32,8x64+32,1x512+8"`` -> [(batch, prompt_len, new_tokens)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            batch, rest = part.split("x")
            prompt, new = rest.split("+")
            out.append((int(batch), int(prompt), int(new)))
        except ValueError:
            raise SystemExit(f"error: setting {part!r} is not BATCHxPROMPT+NEW (e.g. 4x64+32)") from None
    return out


def run_setting(workers, batch: int, prompt_len: int, new_tokens: int, cycles: int, vocab: int,
                failed: dict[str, str], settle: float = 0.0) -> dict:
    """Every contender on the same prompts, alternated (order reversed every other cycle), medians.
    A contender that fails is recorded in ``failed`` and removed from ``workers``."""
    prompts = np.random.default_rng(0).integers(3, vocab, size=(batch, prompt_len)).tolist()

    def ask(w, new):
        try:
            return w.ask({"prompts": prompts, "new_tokens": new})
        except RuntimeError as e:
            failed[w.name] = f"{batch}x{prompt_len}+{new_tokens}: {e}"
            workers.remove(w)
            return None

    for w in list(workers):  # warm-up at this shape
        ask(w, min(4, new_tokens))
    samples = {w.name: {"ttft_ms": [], "decode_tokens_per_s": [], "ids": None} for w in workers}
    for cycle in range(cycles):
        for w in list(workers if cycle % 2 == 0 else workers[::-1]):
            time.sleep(settle)  # the previous contender's spinning threads are done
            r = ask(w, new_tokens)
            if r is None:
                samples.pop(w.name, None)
                continue
            for k in ("ttft_ms", "decode_tokens_per_s"):
                samples[w.name][k].append(r[k])
            samples[w.name]["ids"] = r["ids"]
        log(f"{batch}x{prompt_len}+{new_tokens}: cycle {cycle + 1}/{cycles} done")
    return samples


def main() -> None:
    from llama_trt.runtime.sessions.base import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "seeded"), default="smollm2")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "llama_trt_bench_cpu")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--settings", default="", help="several BATCHxPROMPT+NEW runs, e.g. 1x64+32,4x64+32,1x512+8 "
                    "(default: --batch x --prompt-len + --new-tokens)")
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds to wait before each request (the previous contender's threads stop spinning)")
    ap.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    ap.add_argument("--worker", choices=tuple(KINDS), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.path, args.threads)
    settings = parse_settings(args.settings) if args.settings else [(args.batch, args.prompt_len, args.new_tokens)]
    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)
    plan, skipped = prepare(args, work)
    vocab = json.loads((checkpoint(args.model, work) / "config.json").read_text())["vocab_size"]
    first_open = {}
    for name, (kind, path) in plan.items():
        if kind == "ours":  # the first open of an export builds its session graph (cached): not what is measured
            try:
                w = Worker(name, kind, path, args.threads)
                first_open[name] = w.ask({"stats": 1})
                w.close()
            except Exception:  # noqa: BLE001 - reported when its measured worker fails to start
                pass
    workers = []
    for name, (kind, path) in plan.items():
        try:
            workers.append(Worker(name, kind, path, args.threads))
        except Exception as e:  # noqa: BLE001 - one contender failing to start must not sink the others
            skipped[name] = f"failed to start: {e}"
    runs, failed, everyone = [], {}, list(workers)
    try:
        for batch, prompt_len, new_tokens in settings:
            samples = run_setting(workers, batch, prompt_len, new_tokens, args.cycles, vocab, failed,
                                  args.settle)
            runs.append(((batch, prompt_len, new_tokens), samples))
        stats = {w.name: w.ask({"stats": 1}) for w in workers}
    finally:
        for w in everyone:
            w.close()
    import onnxruntime

    out_runs = []
    for (batch, prompt_len, new_tokens), samples in runs:
        summary = summarize(samples, stats, "ours_fp32")
        out_runs.append({"settings": {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                                      "cycles": args.cycles, "greedy": True},
                         "results": summary, "ratios": ratios(summary)})
    report = {
        "benchmark": "runtime_cpu", "model": args.model,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "threads_every_contender": args.threads,
        "settle_s": args.settle,
        "versions": {"onnxruntime": onnxruntime.__version__,
                     "onnxruntime_genai": _version("onnxruntime_genai"), "transformers": _version("transformers")},
        "skipped": skipped, "failed": failed,
        "first_open": {k: {"open_s": v["open_s"], "peak_rss_mib": v["peak_rss_mib"], "graph_cache": v.get("graph_cache")}
                       for k, v in first_open.items()},
    }
    if len(out_runs) == 1:
        report.update(out_runs[0])
    else:
        report["runs"] = out_runs
    print(json.dumps(report, indent=2))


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
