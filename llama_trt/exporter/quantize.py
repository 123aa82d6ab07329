"""Moved to the :mod:`llama_trt.quantize` package (one module per job); the old names stay
importable from here."""

from ..quantize import QUANTIZE_KWARGS  # noqa: F401
from ..quantize.awq import apply_awq  # noqa: F401
from ..quantize.graph import GraphInfo, LinearSite, analyse_graph, check_no_float_copies, inspect_quantized  # noqa: F401
from ..quantize.pipeline import export_quantized, quantize_folder  # noqa: F401
from ..quantize.qdq import add_weight_dq  # noqa: F401
from ..quantize.report import accuracy_report, heldout_tokens  # noqa: F401
from ..quantize.schemes import SCHEME_NAMES as SCHEMES, QuantizeOptions, parse_options  # noqa: F401
from ..quantize.smoothquant import ort_quantize_w8a8, smooth, smoothing_groups  # noqa: F401
from ..quantize.stats import activation_absmax  # noqa: F401
from ..quantize.weights import quantize_per_channel  # noqa: F401

__all__ = [
    "GraphInfo", "LinearSite", "QuantizeOptions", "SCHEMES", "accuracy_report", "activation_absmax",
    "add_weight_dq", "analyse_graph", "export_quantized", "heldout_tokens", "inspect_quantized",
    "parse_options", "quantize_folder", "quantize_per_channel", "smooth", "smoothing_groups",
]
