"""Moved to :mod:`llama_trt.quantize.calibration`; kept so old imports keep working."""

from ..quantize.calibration import *  # noqa: F401,F403
from ..quantize.calibration import __all__  # noqa: F401
