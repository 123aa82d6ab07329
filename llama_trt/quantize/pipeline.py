"""Quantize an fp32 export: choose the layers, run the scheme's search, write Q/DQ, check, certify.

``quantize_folder`` turns an fp32 export folder into a quantized one; ``export_quantized``
does the fp32 export into a temporary folder first, quantizes, certifies and moves the result
into place (nothing is left on failure or refusal).

Kept in float: RMSNorm / RoPE (the ``llama_trt`` plugin nodes and their function bodies),
attention's activation x activation MatMuls, the KV cache, by default the embedding
(``--quantize-embeddings``), and int8-sq's lm head (the weight-only schemes store it int8 in
blocks of 32; ``--no-quantize-lm-head`` keeps it float). A tied lm head that stays float reads
the embedding table through its Transpose, so the file holds the table once; a quantized tied
head serves the embedding Gather from its own integers (still one copy).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from .calibration import CalibrationData, builtin_calibration, load_calibration_file
from .graph import GraphInfo, LinearSite, _digest, _init_array, analyse_graph, check_no_float_copies, \
    inspect_quantized
from .kernel_form import KEY as KERNEL_KEY, certify_kernel_forms, initial_record
from .qdq import add_weight_dq, gather_from_head, gather_int8_rows, replace_with_dq, store_fp16
from .report import Progress
from .schemes import QuantizeOptions
from .weights import int8_blocked, int8_weight, quantize_blocked

CALIB_BATCH = 4
AWQ_SAMPLES = 16  # calibration sequences whose layer inputs the AWQ search sees
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - (64 << 20)  # as the exporter: weights > ~2 GB go to external data


def _batches(tokens: np.ndarray, size: int = CALIB_BATCH) -> list[np.ndarray]:
    return [tokens[i:i + size] for i in range(0, len(tokens), size)]


def select_sites(info: GraphInfo, options: QuantizeOptions) -> tuple[list[LinearSite], list[dict]]:
    """(layers to quantize, excluded entries with the reason)."""
    sites, excluded = [], []
    for s in info.sites:
        if s.name == "lm_head" and not options.lm_head:
            excluded.append({"name": s.name, "reason": "lm head kept float (--no-quantize-lm-head, or int8-sq's default)"})
        elif any(fnmatch.fnmatchcase(s.name, p) for p in options.exclude):
            excluded.append({"name": s.name, "reason": "kept in float by --quantize-exclude"})
        else:
            sites.append(s)
    if info.tied_head is not None:
        excluded.append({"name": "lm_head", "reason": "tied to the embedding, kept float (one stored copy)"})
    for node in info.attention_matmuls:
        excluded.append({"name": node, "reason": "attention matmul (activation x activation; KV cache stays fp32)"})
    if info.embedding is not None and not options.embeddings:
        excluded.append({"name": "model.embed_tokens", "reason": "embedding kept float (--quantize-embeddings)"})
    return sites, excluded


def calibration(options: QuantizeOptions, base_dir: Path, base, tokenizer_files, prog) -> CalibrationData:
    cfg = base.config
    if options.calib_data is not None:
        return load_calibration_file(options.calib_data, vocab_size=int(cfg["vocab_size"]),
                                     samples=options.calib_samples, seq_len=options.calib_seq_len,
                                     tokenizer_files=tokenizer_files, bos=cfg.get("bos_token_id"))
    from ..exporter.feeds import ort_session

    steps = max(0, options.calib_seq_len - 1 - 3)
    return builtin_calibration(ort_session(base_dir), base, samples=options.calib_samples,
                               seq_len=options.calib_seq_len, seed=options.seed,
                               on_step=prog.task("generate calibration text", steps))


def _torch_model(cfg: dict, state_dict):
    import torch

    from ..config import LlamaConfig
    from ..model import LlamaForCausalLM

    config = LlamaConfig.from_dict(cfg)
    model = LlamaForCausalLM(config)
    state = {k: (v if hasattr(v, "detach") else torch.from_numpy(np.asarray(v))).to(torch.float32)
             for k, v in state_dict.items()}
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def awq_search(model, sites, group, options, record, *, base_dir, base, state_dict, tokenizer_files,
               prog, calib=None, torch_model=None):
    """Calibrate (unless ``calib`` is given), capture the layers' inputs (torch) over the first
    :data:`AWQ_SAMPLES` sequences, search and fold AWQ scales; returns (clips, AwqReport)."""
    from .awq import apply_awq
    from .stats import input_key, linear_inputs

    if calib is None:
        calib = calibration(options, base_dir, base, tokenizer_files, prog)
    record["calibration"] = calib.to_dict()
    searched = [s for s in sites if s.name != "lm_head"]
    batches = _batches(calib.tokens[:AWQ_SAMPLES])  # 512 rows are sampled: more only costs memory
    torch_model = torch_model or _torch_model(base.config, state_dict)
    inputs = linear_inputs(torch_model, batches, [s.name for s in searched],
                           seed=options.seed, on_batch=prog.task("activation capture (torch)", len(batches)))
    clips, report = apply_awq(model, searched, inputs, group, options.scheme.symmetric, base.config,
                              on_group=prog.task("AWQ scale search", len({input_key(s.name) for s in searched})))
    record["awq"] = report.to_dict()
    return clips, report


def quantize_int8_weight(model, sites, options, *, base_dir, base, state_dict, tokenizer_files,
                         prog) -> dict[str, Any]:
    """int8 per channel, after the activation-aware scale search, rounded by GPTQ (int8-weight)."""
    record: dict[str, Any] = {}
    sch = options.scheme
    calib = calibration(options, base_dir, base, tokenizer_files, prog) if sch.calibrated else None
    torch_model = _torch_model(base.config, state_dict) if sch.calibrated else None
    vectors: dict[str, np.ndarray] = {}
    if sch.awq:
        _, report = awq_search(model, sites, None, options, record, base_dir=base_dir, base=base,
                               state_dict=state_dict, tokenizer_files=tokenizer_files, prog=prog, calib=calib,
                               torch_model=torch_model)
        vectors = report.vectors
    if not sch.gptq:
        for s in sites:
            _int8_dq(model, s, options)
        return record
    record["calibration"] = calib.to_dict()
    record["gptq"] = gptq_round(model, sites, torch_model, _batches(calib.tokens), vectors, prog, options)
    return record


def gptq_round(model, sites, torch_model, batches, awq_vectors, prog, options) -> dict[str, Any]:
    """Hessians of the layers' inputs over every calibration token (of the float model: an AWQ fold
    divides a layer's input by ``s``, so its Hessian by ``s s^T``), then GPTQ per layer (the head
    on its block grid, :meth:`QuantizeOptions.head_block`)."""
    from .gptq import GptqSettings, gptq_int8, output_error
    from .stats import input_key, linear_hessians
    from .weights import QuantizedWeight

    hessians, tokens = linear_hessians(torch_model, batches, [s.name for s in sites],
                                       on_batch=prog.task("Hessians of the layer inputs (torch)", len(batches)))
    settings = GptqSettings()
    tick = prog.task("GPTQ rounding", len(sites))
    err_rtn = err_gptq = 0.0
    for s in sites:
        key = input_key(s.name)
        h = hessians[key]
        if key in awq_vectors:
            inv = 1.0 / awq_vectors[key].astype(np.float64)
            h = h * np.outer(inv, inv)
        w = _init_array(model.graph, s.weight)
        group = _int8_group(s, options)
        q, scale = gptq_int8(w, h, settings, group)
        rtn = _int8_rtn(w, group)  # the same grid, each weight rounded on its own: GPTQ's baseline
        err_rtn += output_error(w, rtn.q, rtn.scale, h)
        err_gptq += output_error(w, q, scale, h)
        zp = np.zeros(scale.shape, np.int8) if group is None else None
        replace_with_dq(model, s.weight, QuantizedWeight(q, scale, zp, 1 if group is None else 0, group, "int8"))
        tick()
    return {**settings.to_dict(), "hessian_tokens": int(tokens), "layers": len(sites),
            "output_error_vs_rtn": round(err_gptq / err_rtn, 4) if err_rtn else None}


def quantize_int4(model, sites, options, *, base_dir, base, state_dict, tokenizer_files, prog) -> dict[str, Any]:
    """int4 blocks where the group divides K, int8 per-channel elsewhere; AWQ first for int4-awq."""
    sch = options.scheme
    g = sch.group_size
    head8 = [s for s in sites if s.name == "lm_head" and options.head_bits == 8]
    int4 = [s for s in sites if s.shape[0] % g == 0 and s not in head8]
    int8 = [s for s in sites if s.shape[0] % g and s not in head8]
    record: dict[str, Any] = {"int4": [s.name for s in int4],
                              "int8_fallback": [{"name": s.name, "reason": f"group {g} does not divide K={s.shape[0]}"}
                                                for s in int8]}
    int8 += head8
    clips: dict[str, np.ndarray] = {}
    if sch.awq:
        clips, _ = awq_search(model, int4, g, options, record, base_dir=base_dir, base=base, state_dict=state_dict,
                              tokenizer_files=tokenizer_files, prog=prog)
    for s in int4:
        w = _init_array(model.graph, s.weight)
        replace_with_dq(model, s.weight, quantize_blocked(w, g, symmetric=sch.symmetric, clip=clips.get(s.name)))
    for s in int8:
        _int8_dq(model, s, options)
    return record


def _int8_group(site, options) -> int | None:
    """Block along K of an int8 layer: the head's (:meth:`QuantizeOptions.head_block`), else None (per channel)."""
    return options.head_block(site.shape[0]) if site.name == "lm_head" else None


def _int8_rtn(w: np.ndarray, group: int | None):
    return int8_weight(w) if group is None else int8_blocked(w, group)


def _int8_dq(model, site, options) -> None:
    """Round-to-nearest int8: per output channel, the head in blocks along K."""
    replace_with_dq(model, site.weight, _int8_rtn(_init_array(model.graph, site.weight), _int8_group(site, options)))


def quantize_int8_sq(model, sites, info, options, *, base_dir, base, tokenizer_files, work, prog):
    """SmoothQuant W8A8 with damage-ranked W8A16 fallback; refuses (ExportError) above target."""
    import onnx

    from ..validate.tolerances import SCHEME_GATES
    from .report import eval_tokens, ort_kl, ort_logits
    from .smoothquant import layer_damage, most_damaged, ort_quantize_w8a8, refusal, smooth, smoothing_groups
    from .stats import activation_absmax, capture_tensors

    calib = calibration(options, base_dir, base, tokenizer_files, prog)
    batches = _batches(calib.tokens)
    groups = smoothing_groups(model, sites)
    act = activation_absmax(model, base, batches, sorted({g[1] for g in groups}),
                            on_batch=prog.task("activation statistics", len(batches)))
    stats = smooth(model, groups, act, options.sq_alpha)
    smoothed = {c.name for g in groups for c in g[2]}
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    smoothed_path = work / "smoothed.onnx"
    onnx.save(model, str(smoothed_path), save_as_external_data=external)
    tokens = eval_tokens(base_dir, tokenizer_files)
    ref = ort_logits(base.model_path(base_dir), base, tokens)
    target = options.sq_target_kl or SCHEME_GATES["int8-sq"]["kl"]
    skip_always = list(info.attention_matmuls) + [s.node for s in info.sites if s not in sites]

    def attempt(fallback: list[str]) -> tuple[Path, float]:
        qpath = work / f"w8a8-{len(fallback)}.onnx"
        keep = {s.node for s in sites if s.name in fallback}
        ort_quantize_w8a8(smoothed_path, qpath, base, batches, [s.node for s in sites if s.node not in keep],
                          skip_always + sorted(keep), external_data=external,
                          on_batch=prog.task(f"calibrate + insert Q/DQ ({len(fallback)} layers W8A16)", len(batches)))
        if fallback:
            m = onnx.load(str(qpath))
            for s in sites:
                if s.name in fallback:
                    add_weight_dq(m, s.weight, axis=1)
            onnx.save(m, str(qpath), save_as_external_data=external)
        return qpath, ort_kl(ref, qpath, base, tokens)

    qpath, kl_all = attempt([])
    kl, fallback, damage = kl_all, [], {}
    if kl_all > target:
        rows, maxes = capture_tensors(model, base, batches, sorted({s.input for s in sites}))
        damage = layer_damage({s.name: rows[s.input] for s in sites},
                              {s.name: _init_array(model.graph, s.weight) for s in sites},
                              {s.name: maxes[s.input] for s in sites})
        fallback = most_damaged(damage, 1 / 3)
        qpath, kl = attempt(fallback)
        if kl > target:
            raise ExportError(refusal(kl, target, fallback, kl_all))
    record = {
        "calibration": calib.to_dict(), "sq_alpha": options.sq_alpha,
        "smoothing": {"alpha": options.sq_alpha, "smoothed_norms": sorted(stats), "smoothed_layers": sorted(smoothed),
                      "unsmoothed_layers": [s.name for s in sites if s.name not in smoothed], "scale_stats": stats},
        "activations": {"dtype": "int8", "granularity": "per-tensor", "symmetric": True, "zero_point": 0,
                        "calibration": "minmax", "inserted_by": "onnxruntime.quantization"},
        "sq_target_kl": target, "kl_w8a8_all_layers": kl_all, "kl": kl,
        "w8a16_fallback": fallback, "layer_damage": {k: round(v, 5) for k, v in damage.items()},
        "kl_eval_tokens": int(tokens.size),
    }
    return onnx.load(str(qpath)), record


def _write(model, out_dir: Path) -> bool:
    import onnx

    from ..exporter.manifest import EXTERNAL_DATA_NAME, MODEL_NAME

    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    for f in (MODEL_NAME, EXTERNAL_DATA_NAME):
        (out_dir / f).unlink(missing_ok=True)
    onnx.save(model, str(out_dir / MODEL_NAME), save_as_external_data=external,
              location=EXTERNAL_DATA_NAME, all_tensors_to_one_file=True)
    return external


def _mark(model, options: QuantizeOptions) -> None:
    meta = {p.key: p.value for p in model.metadata_props}
    meta["llama_trt.dtype"] = options.scheme.weight_dtype if options.scheme.weight_bits == 8 else "int4"
    meta["llama_trt.quantization"] = options.scheme.name
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "llama-trt"


def _check(model, base, options, originals, keep_float) -> dict:
    facts = inspect_quantized(model)
    if sorted(f.name for f in model.functions) != sorted(p.op_type for p in base.plugin_ops) or \
            facts["plugin_nodes"] != sum(p.count for p in base.plugin_ops):
        raise ExportError("internal error: llama_trt plugin nodes or functions were lost in quantization")
    if options.scheme.symmetric and not facts["zero_points_all_zero"]:
        raise ExportError("internal error: a quantization zero point is not 0 (TensorRT needs symmetric int8/int4)")
    check_no_float_copies(model, originals, keep_float)
    return facts


def quantize_folder(base_dir, out_dir, options: QuantizeOptions, *, state_dict=None, tokenizer_files=(),
                    progress: bool = False, ort_check: bool = True):
    """Quantize the fp32 export in ``base_dir`` into ``out_dir`` (an existing empty folder).

    Returns the new :class:`ExportManifest` (dtype "int8" or "int4", ``quantization`` filled in)."""
    import onnx

    from ..exporter.core import check_exported
    from ..exporter.manifest import EXTERNAL_DATA_NAME, MANIFEST_NAME, load_manifest
    from ..plugins.onnx_support import register_all_schemas

    register_all_schemas()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base = load_manifest(base_dir)
    if base.dtype != "fp32":
        raise ExportError(f"quantization starts from an fp32 export; {base_dir} is {base.dtype}")
    if state_dict is None:
        from ..checkpoint import load_checkpoint

        state_dict = load_checkpoint(base.source_checkpoint).state_dict
    model = onnx.load(str(base.model_path(base_dir)))
    info = analyse_graph(model, state_dict, materialize_tied=options.lm_head)
    sites, excluded = select_sites(info, options)
    if options.lm_head and not any(s.name == "lm_head" for s in info.sites):
        raise ExportError("internal error: the lm head MatMul was not found in the export")
    originals = {_digest(_init_array(model.graph, s.weight)): s.name for s in sites}
    sch = options.scheme
    record: dict[str, Any] = {}
    with Progress(progress) as prog, tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_dir) as work:
        if sch.activations:
            model, record = quantize_int8_sq(model, sites, info, options, base_dir=base_dir, base=base,
                                             tokenizer_files=tokenizer_files, work=Path(work), prog=prog)
        elif sch.weight_bits == 4:
            record = quantize_int4(model, sites, options, base_dir=base_dir, base=base, state_dict=state_dict,
                                   tokenizer_files=tokenizer_files, prog=prog)
        else:
            record = quantize_int8_weight(model, sites, options, base_dir=base_dir, base=base, state_dict=state_dict,
                                          tokenizer_files=tokenizer_files, prog=prog)
        del state_dict
        keep_float, embedding = _embedding(model, info, sites, options)
        _mark(model, options)
        facts = _check(model, base, options, originals, keep_float)
        external = _write(model, out_dir)
        del model
    import onnxruntime

    record = {
        "scheme": sch.name, "group_size": sch.group_size, "spec": sch.to_dict(), "format": "QDQ",
        "compute_dtype": "float32",
        "weights": {"dtype": sch.weight_dtype, "granularity": "per-channel" if sch.weight_bits == 8 else "block",
                    "axis": 1 if sch.weight_bits == 8 else 0, "block_size": sch.group_size,
                    "symmetric": sch.symmetric, "zero_point": 0 if sch.symmetric else "uint4 per block",
                    "inserted_by": "onnxruntime.quantization" if sch.activations else "llama_trt"},
        "activations": None, "sq_alpha": None, "smoothing": None, "calibration": None,
        **record,
        "quantize_embeddings": bool(options.embeddings), "quantize_lm_head": bool(options.lm_head),
        "lm_head": options.head_dtype,
        "lm_head_block_size": next((_int8_group(s, options) for s in sites if s.name == "lm_head"), None),
        "embedding": embedding, "quantized": [s.name for s in sites], "excluded": excluded,
        **({KERNEL_KEY: kernel} if (kernel := initial_record(sch.name, options.head_dtype, _kernel_request(options)))
           else {}),
        "weight_bytes": facts["weight_bytes"], "library": {"onnxruntime": onnxruntime.__version__},
        "base_model_bytes": base.model_bytes,
    }
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file() and f.name != MANIFEST_NAME)
    manifest = replace(
        base, dtype="int4" if sch.weight_bits == 4 else "int8", quantization=record, model_bytes=size,
        external_data=EXTERNAL_DATA_NAME if external else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    check_exported(out_dir, manifest, ort_smoke=ort_check)
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _kernel_request(options: QuantizeOptions) -> dict[str, int]:
    """The ONNX Runtime kernel form values the options name (the rest: chosen by the certificate)."""
    asked = {"int8_block": options.int8_kernel_block, "head_scan_bits": options.head_scan_bits}
    return {k: v for k, v in asked.items() if v is not None}


def _embedding(model, info: GraphInfo, sites, options) -> tuple[list[str], str]:
    """Quantize / share the embedding table; returns (float initializers allowed to stay, what was done)."""
    if info.embedding is None:
        return [], "none"
    gather, table = info.embedding
    head = next((s for s in sites if s.name == "lm_head"), None)
    tied_copy = head is not None and info.head_is_table
    if tied_copy:  # the quantized tied head serves the embedding rows too
        if options.head_bits == 8:
            gather_int8_rows(model, gather, table, head.weight)
            return [], "tied: rows gathered from the int8 lm head, then scaled (one stored copy)"
        gather_from_head(model, gather, table, f"{head.weight}_DequantizeLinear_Output")
        return [], "tied: gathered from the dequantized lm head (one stored copy)"
    if options.embeddings:
        add_weight_dq(model, table, axis=0)
        return [], "int8 per-row"
    store_fp16(model, table)
    return [table], "fp16 on disk, Cast to fp32" + (" (tied: the lm head reads it too)" if info.tied_head else "")


def export_quantized(checkpoint, out_dir, options: QuantizeOptions, *, dtype: str = "fp32", opset: int = 23,
                     force: bool = False, progress: bool = False, ort_check: bool = True):
    """fp32 export into a temporary folder, quantize, certify, move into ``out_dir`` (nothing left on failure)."""
    from ..checkpoint import detect_format, load_checkpoint
    from ..config import Precision
    from ..exporter.core import _move_into_place, _prepare_out_dir, export as fp_export

    if Precision.parse(dtype) is not Precision.FP32:
        raise ExportError(f"--quantize {options.scheme.name} needs --dtype fp32 (the quantized graph keeps fp32 "
                          f"activations); got --dtype {dtype}")
    from ..checkpoint.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a Hugging Face id -> its cached snapshot
    out_dir = Path(out_dir).absolute()
    detect_format(checkpoint)
    tmp = _prepare_out_dir(out_dir, force)
    try:
        base_dir = tmp / "fp32-base"
        fp_export(checkpoint, base_dir, dtype="fp32", opset=opset, force=False, progress=progress, ort_check=False)
        ckpt = load_checkpoint(checkpoint)
        manifest = quantize_folder(base_dir, tmp, options, state_dict=ckpt.state_dict,
                                   tokenizer_files=ckpt.tokenizer_files, progress=progress, ort_check=ort_check)
        for f in ckpt.tokenizer_files:
            shutil.copy2(f, tmp / Path(f).name)
        shutil.rmtree(base_dir)
        if options.certify:
            manifest = certify_export(tmp, ckpt, manifest, progress=progress)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def certify_export(folder: Path, ckpt, manifest, *, progress: bool = False, reference=None):
    """Teacher-forced certificate (validate's) of the quantized export, kept in its manifest
    (``reference``: a shared TorchReference of ``ckpt``, or None)."""
    from ..exporter.manifest import MANIFEST_NAME
    from ..validate.teacher_forced import certify

    if KERNEL_KEY in manifest.quantization:  # ONNX Runtime's kernel form is chosen by certificate
        return certify_kernel_forms(folder, ckpt, manifest, progress=progress, reference=reference)
    cert = certify(folder, ckpt, scheme=manifest.quantization["scheme"], progress=progress, reference=reference)
    manifest = replace(manifest, certificate=cert.to_dict())
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


__all__ = ["certify_export", "export_quantized", "quantize_folder", "select_sites"]
