"""loldu: LoLDU parameter-efficient fine-tuning for PyTorch.

Freeze a pretrained weight, take the leading r components of its LDU factorization, and train
only an r-vector (and optionally one scale) per adapted matrix.
"""
from ._backend import build_info
from .errors import AdapterError, ExportError, FactorizationError, LolduError, ShapeError
from .ldu import LDUResult, ldu, ldu_from_pivots
from .ops import adapter_linear, delta_weight

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "ExportError", "FactorizationError", "LDUResult", "LolduError", "ShapeError",
    "adapter_linear", "build_info", "delta_weight", "ldu", "ldu_from_pivots",
]
