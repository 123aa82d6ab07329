"""``llama-trt demo``: the whole pipeline on a built-in model, no download.

Makes a small seeded LLaMA with GQA and a BPE tokenizer trained on a
built-in text (so text goes in and out), then runs the real stages: export
fp32 / fp16 / int8 (plugin nodes), validate each against torch (JSON report +
plot), build TensorRT engines where TensorRT or TensorRT-RTX is installed
(ahead-of-time on a CPU-only machine), generate text through the runtime and a
short bench. Ends with one summary table and ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LlamaTrtError
from .outputs import DEMO_KIND, MANIFEST, check_output, manifest_kind

DEMO_MARKER = "demo-summary.json"

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


@dataclass(frozen=True)
class DemoRow:
    artifact: str
    path: str
    size_bytes: int
    verdict: str                 # "pass" | "FAIL" | "built (not run: no GPU)" | ...
    key_metric: str              # e.g. "KL 1e-9, top-1 100%"
    tokens_per_s: float | None
    report: str | None = None
    plot: str | None = None


@dataclass(frozen=True)
class DemoSummary:
    out_dir: str
    checkpoint: str
    rows: tuple[DemoRow, ...]
    prompt: str
    generated_text: str
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(r.verdict != "FAIL" for r in self.rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _prepare_out_dir(out: Path, force: bool) -> None:
    """An earlier demo folder is replaced as it is; anything else only as :mod:`llama_trt.outputs` allows."""
    earlier = manifest_kind(out) == DEMO_KIND
    check_output(out, force=force or earlier, option="--out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"kind": DEMO_KIND}))  # written first: a cut-short demo is ours too


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
    from .checkpoint import random_state_dict, save_hf_checkpoint, tiny_config

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


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".plan"))


def _key_metric(report) -> str:
    kl = report.metric("kl").value
    top1 = report.metric("top1").value
    return f"KL {kl:.1e}, top-1 {top1:.0%}, greedy {report.greedy.agreement:.0%}"


def run_demo(out_dir="llama-trt-demo", *, size: str = "small", force: bool = False, steps: int = 16,
             new_tokens: int = 24, prompt: str = "Once upon a time", console=None) -> DemoSummary:
    """Run the pipeline; returns the summary (also written to ``out_dir/summary.json``)."""
    from rich.console import Console

    from .exporter import export
    from .runtime.bench import bench
    from .runtime.generate import GenerationConfig, generate
    from .runtime.sessions import open_session
    from .runtime.tokenizer import load_tokenizer
    from .validate import validate
    from .validate.render import plot_report

    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    notes: list[str] = []
    rows: list[DemoRow] = []

    def stage(msg: str) -> None:
        console.rule(f"[bold]{msg}")

    stage("1/6 seeded LLaMA (GQA) + BPE tokenizer trained on built-in text")
    ckpt = make_demo_checkpoint(out / "checkpoint", size=size)

    exports = {}
    for name, kw in (("onnx-fp32", dict(dtype="fp32")), ("onnx-fp16", dict(dtype="fp16")),
                     ("onnx-int8", dict(dtype="fp32", quantize="int8-weight"))):
        stage(f"2/6 export {name}")
        exports[name] = out / name
        export(ckpt, exports[name], force=True, progress=True, **kw)

    reports = {}
    for name, path in exports.items():
        stage(f"3/6 validate {name} against torch (fp32)")
        (out / "reports").mkdir(exist_ok=True)
        report = validate(path, ckpt, steps=steps, progress=True,
                          run_results_path=out / "reports" / f"{name}.run_results.json")
        report_path = out / "reports" / f"{name}.json"
        plot_path = out / "reports" / f"{name}.png"
        report.save(report_path)
        plot_report(report, plot_path)
        reports[name] = (report, report_path, plot_path)
        console.print(f"{name}: {'pass' if report.passed else 'FAIL'} ({_key_metric(report)})")

    stage("4/6 TensorRT engines")
    engines = _build_engines(out, exports, console, notes)

    stage("5/6 generate text through the runtime (ONNX Runtime, fp32 export)")
    tokenizer = load_tokenizer(exports["onnx-fp32"])
    with open_session(exports["onnx-fp32"], "onnxruntime") as session:
        result = generate(session, prompt, GenerationConfig(max_new_tokens=new_tokens), tokenizer)
    console.print(f"[bold]{prompt}[/bold]{result.text}")

    stage("6/6 short bench (ONNX Runtime, batch 1)")
    speeds = {}
    for name, path in exports.items():
        with open_session(path, "onnxruntime") as session:
            b = bench(session, prompt_len=16, new_tokens=16, runs=3, bandwidth_gib=None, artifact=str(path))
        speeds[name] = b.decode_tokens_per_s_median

    for name, path in exports.items():
        report, report_path, plot_path = reports[name]
        rows.append(DemoRow(name, str(path), _dir_size(path), "pass" if report.passed else "FAIL",
                            _key_metric(report), speeds[name], str(report_path), str(plot_path)))
    for name, (path, verdict) in engines.items():
        rows.append(DemoRow(name, str(path), _dir_size(path), verdict, "-", None))

    summary = DemoSummary(str(out), str(ckpt), tuple(rows), prompt, result.text or "",
                          round(time.perf_counter() - started, 1), tuple(notes))
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    (out / DEMO_MARKER).write_text(json.dumps({"made_by": "llama-trt demo", "size": size}))
    return summary


def _build_engines(out: Path, exports: dict, console, notes: list[str]) -> dict:
    """fp16 and int8 engines when a TensorRT flavour is importable; {name: (path, verdict)}."""
    from .errors import BackendUnavailableError
    from .trt_engines.backend import detect_backend
    from .trt_engines.builder import BuildOptions, build_engine

    try:
        backend = detect_backend()
    except BackendUnavailableError as e:
        notes.append(f"no TensorRT engines: {e}")
        console.print(f"skipped: {e}")
        return {}
    built = {}
    for name in ("onnx-fp16", "onnx-int8"):
        engine_name = name.replace("onnx", "engine")
        path = out / engine_name
        options = BuildOptions(max_batch=4, max_seq=128, max_context=256, force=True, progress=True)
        build_engine(exports[name], path, options)
        verdict = "built" if _gpu_present() else "built AOT (no GPU here to run it)"
        built[f"{engine_name} ({backend.name})"] = (path, verdict)
    return built


def _gpu_present() -> bool:
    from .trt_engines.compat import gpu_compute_capability

    try:
        return gpu_compute_capability() is not None
    except Exception:  # noqa: BLE001 - no driver / no device
        return False


def render_summary(summary: DemoSummary, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"llama-trt demo ({summary.seconds:.0f} s)")
    for col in ("artifact", "size", "validation", "key metric vs torch fp32", "decode tok/s"):
        table.add_column(col)
    for r in summary.rows:
        table.add_row(r.artifact, f"{r.size_bytes / 2**20:.2f} MiB", r.verdict, r.key_metric,
                      f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "-")
    console.print(table)
    console.print(f"prompt: {summary.prompt!r} -> {summary.generated_text!r}")
    for r in summary.rows:
        if r.report:
            console.print(f"report {r.artifact}: {r.report}  plot: {r.plot}")
    for n in summary.notes:
        console.print(f"note: {n}")
    console.print(f"summary: {Path(summary.out_dir) / 'summary.json'}")
