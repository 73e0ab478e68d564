"""loldu: LoLDU parameter-efficient fine-tuning for PyTorch.

Freeze a pretrained weight, take the leading r components of its LDU factorization, and train
only an r-vector (and optionally one scale) per adapted matrix.
"""
from ._backend import build_info
from .errors import AdapterError, ExportError, FactorizationError, LolduError, ShapeError
from .ldu import LDUResult, ldu, ldu_from_pivots
from .ops import adapter_linear, delta_weight
from .config import LoLDUConfig
from .layer import LoLDUConv1D, LoLDUConv2d, LoLDUEmbedding, LoLDULayer, LoLDULinear
from .model import (
    active_adapter, adapted_layers, adapter_ids, adapter_names, add_adapter, delete_adapter, disabled, inject,
    merge, merge_and_unload, print_trainable_parameters, set_adapter, trainable_parameters, unload, unmerge,
)
from .adapter_io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "ExportError", "FactorizationError", "LDUResult", "LolduError", "ShapeError",
    "adapter_linear", "build_info", "delta_weight", "ldu", "ldu_from_pivots",
]
__all__ += [
    "LoLDUConfig", "LoLDUConv1D", "LoLDUConv2d", "LoLDUEmbedding", "LoLDULayer", "LoLDULinear",
    "active_adapter", "adapted_layers", "adapter_ids", "adapter_names", "add_adapter", "delete_adapter",
    "disabled", "inject", "load_adapter", "merge", "merge_and_unload", "print_trainable_parameters",
    "save_adapter", "set_adapter", "trainable_parameters", "unload", "unmerge",
]
