"""Pipeline stage: quantize an fp32 ONNX export (int8-weight, int8-sq, int4-awq, int4-rtn).

Modules, one job each:

* ``schemes``      the schemes as data (:class:`Scheme`) and the options of a run
* ``calibration``  calibration token ids (a file, or the model's own sampled text)
* ``stats``        activation statistics (ONNX Runtime outputs, torch forward hooks)
* ``awq``          AWQ's activation-aware scale search and clipping search
* ``smoothquant``  SmoothQuant smoothing, W8A8 Q/DQ (onnxruntime.quantization), damage, refusal
* ``weights``      int8 per-channel / int4 blocked quantizers, the DQ reference, ONNX tensors
* ``graph``        linear layers of an export, Q/DQ inspection, weight bytes per type
* ``qdq``          the graph rewrite: initializer -> integer + scale + DequantizeLinear
* ``report``       accuracy against the fp32 export (ONNX Runtime), progress bars
* ``pipeline``     quantize_folder / export_quantized (+ the export-time certificate)

Imports here are lazy: ``import llama_trt.quantize`` loads neither onnx nor torch.
"""

from __future__ import annotations

QUANTIZE_KWARGS = ("quantize_embeddings", "quantize_lm_head", "sq_alpha", "calib_data", "calib_samples",
                   "calib_seq_len", "seed", "exclude", "group_size", "int4_zero_point", "sq_target_kl", "certify",
                   "int8_kernel_block", "head_scan_bits")

_LAZY = {
    "QuantizeOptions": "schemes", "SCHEMES": "schemes", "SCHEME_NAMES": "schemes", "Scheme": "schemes",
    "parse_options": "schemes", "quantize_folder": "pipeline", "export_quantized": "pipeline",
    "accuracy_report": "report", "heldout_tokens": "report", "inspect_quantized": "graph",
    "analyse_graph": "graph",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["QUANTIZE_KWARGS", *_LAZY]
