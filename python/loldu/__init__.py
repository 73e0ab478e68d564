"""loldu: LoLDU parameter-efficient fine-tuning for PyTorch.

Freeze a pretrained weight, take the leading r components of its LDU factorization, and train
only an r-vector (and optionally one scale) per adapted matrix.

The top level holds the verbs a user calls on a model; the ops (`ldu`, `ldu_from_pivots`,
`adapter_linear`, `delta_weight`) live in `loldu.ops`, the layer classes in `loldu.layer`, ONNX
export in `loldu.export`.
"""
from . import ops  # noqa: F401  (loldu.ops: the ops, one namespace below the verbs)
from ._backend import build_info
from .adapter_io import load_adapter, save_adapter
from .config import LoLDUConfig
from .errors import AdapterError, ExportError, FactorizationError, LolduError, LolduWarning, ShapeError
from .model import (
    active_adapter,
    adapted_layers,
    adapter_ids,
    adapter_names,
    add_adapter,
    delete_adapter,
    disabled,
    inject,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .wrapper import LoLDUModel, get_loldu_model

__version__ = "0.1.0"

# The transformers Trainer integration imports transformers: loaded on first use only.
_LAZY = {"LoLDUTrainer": "trainer", "LoLDUTrainerMixin": "trainer", "restore_adapter": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'loldu' has no attribute {name!r}")

__all__ = [
    "LoLDUConfig", "inject", "add_adapter", "set_adapter", "delete_adapter", "adapter_names", "active_adapter",
    "adapted_layers", "trainable_parameters", "print_trainable_parameters", "merge", "unmerge", "unload",
    "merge_and_unload", "disabled", "adapter_ids", "save_adapter", "load_adapter", "build_info",
    "LoLDUModel", "get_loldu_model", "LoLDUTrainer", "LoLDUTrainerMixin", "restore_adapter",
    "LolduError", "FactorizationError", "ShapeError", "AdapterError", "ExportError", "LolduWarning",
]
