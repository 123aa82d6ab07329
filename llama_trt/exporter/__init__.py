"""Pipeline stage: exporter (torch -> ONNX with ``llama_trt`` plugin nodes + manifest.json).

``export`` needs torch; ``load_manifest`` / ``build_feeds`` do not.
"""

from .manifest import ExportManifest, TensorSpec, load_manifest


def export(checkpoint, out_dir, dtype: str = "fp32", opset: int = 23, force: bool = False, quantize=None,
           **kwargs) -> ExportManifest:
    """Export a checkpoint to ``out_dir`` (see :func:`llama_trt.exporter.core.export`).

    ``quantize``: None, "int8-weight" or "int8-sq" (or a ``QuantizeOptions``); the
    quantization keywords (``quantize_embeddings``, ``quantize_lm_head``, ``sq_alpha``,
    ``calib_data``, ``calib_samples``, ``calib_seq_len``) go to
    :func:`llama_trt.exporter.quantize.parse_options` (see exporter/quantize.py).
    """
    from ..errors import ExportError
    from ..outputs import check_output

    # refuse before any work: -o must not be the checkpoint, its parent or the working directory
    check_output(out_dir, force=force, inputs=(checkpoint,), option="-o", error=ExportError)
    if quantize is not None:
        from .quantize import QUANTIZE_KWARGS, export_quantized, parse_options

        qkw = {k: kwargs.pop(k) for k in list(kwargs) if k in QUANTIZE_KWARGS}
        options = parse_options(quantize, **qkw)
        return export_quantized(checkpoint, out_dir, options, dtype=dtype, opset=opset, force=force, **kwargs)
    from .core import export as _export

    return _export(checkpoint, out_dir, dtype=dtype, opset=opset, force=force, **kwargs)


__all__ = ["ExportManifest", "TensorSpec", "export", "load_manifest"]
