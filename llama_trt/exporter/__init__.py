"""Pipeline stage: exporter (torch -> ONNX with ``llama_trt`` plugin nodes + manifest.json).

``export`` needs torch; ``load_manifest`` / ``build_feeds`` do not.
"""

from .manifest import ExportManifest, TensorSpec, load_manifest


def export(checkpoint, out_dir, dtype: str = "fp32", opset: int = 23, force: bool = False, quantize=None,
           **kwargs) -> ExportManifest:
    """Export a checkpoint to ``out_dir`` (see :func:`llama_trt.exporter.core.export`).

    ``quantize``: None or a scheme name ("int8-weight", "int8-sq", "int4-awq", "int4-rtn", or a
    ``QuantizeOptions``); the quantization keywords (``quantize_lm_head``, ``group_size``,
    ``int4_zero_point``, ``sq_alpha``, ``sq_target_kl``, ``calib_data``, ``certify``, ...) go to
    :func:`llama_trt.quantize.schemes.parse_options` (see the llama_trt/quantize package).
    """
    from ..errors import ExportError
    from ..outputs import check_output

    # refuse before any work: -o must not be the checkpoint, its parent or the working directory
    check_output(out_dir, force=force, inputs=(checkpoint,), option="-o", error=ExportError)
    if quantize is not None:
        from ..quantize import QUANTIZE_KWARGS
        from ..quantize.pipeline import export_quantized
        from ..quantize.schemes import parse_options

        qkw = {k: kwargs.pop(k) for k in list(kwargs) if k in QUANTIZE_KWARGS}
        options = parse_options(quantize, **qkw)
        return export_quantized(checkpoint, out_dir, options, dtype=dtype, opset=opset, force=force, **kwargs)
    from .core import export as _export

    return _export(checkpoint, out_dir, dtype=dtype, opset=opset, force=force, **kwargs)


__all__ = ["ExportManifest", "TensorSpec", "export", "load_manifest"]
