"""The adapter format, as data: adapter_spec.json (shipped in the package), read once.

One description serves both readers: the Python package reads it here, and the C++ library reads
the header cpp/include/loldu/spec.h generated from it (cpp/tools/gen_spec_header.py), so the config
keys, their enums and defaults, the task types, the tensor table, the dtype names and the format
constants cannot drift apart. The coefficient formulas (docs/method.md §1, §9) come with golden
vectors that both sides' tests check.
"""
import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch

SPEC_PATH = Path(__file__).with_name("adapter_spec.json")
SPEC: dict = json.loads(SPEC_PATH.read_text(encoding="utf-8"))

_FORMAT = SPEC["format"]
FORMAT: str = _FORMAT["name"]
FORMAT_VERSION: int = _FORMAT["version_written"]
READABLE_VERSIONS: Tuple[int, ...] = tuple(_FORMAT["versions_read"]["python"])
# The C++ reader leaves out format 1, whose config lives outside the weights file.
CPP_READABLE_VERSIONS: Tuple[int, ...] = tuple(_FORMAT["versions_read"]["cpp"])
VERSION_MAX_DIGITS: int = _FORMAT["version_max_digits"]
# From this format on, each layer entry holds its rank and z, pivots are the layers' vectors concatenated.
RAGGED_FROM: int = _FORMAT["ragged_from"]
WEIGHTS_NAME: str = _FORMAT["weights_file"]
CONFIG_NAME: str = _FORMAT["config_file"]
LEGACY_CONFIG_NAME: str = _FORMAT["legacy_config_file"]  # formats 1 and 2 (PEFT's file name)

# safetensors metadata keys of an adapter file.
META_FORMAT: str = SPEC["metadata"]["format"]
META_CONFIG: str = SPEC["metadata"]["config"]
META_CONFIG_SHA256: str = SPEC["metadata"]["config_sha256"]
META_V1_CONFIG_SHA256: str = SPEC["metadata"]["v1_config_sha256"]

LAYER_KINDS: Tuple[str, ...] = tuple(SPEC["layer_kinds"])
# A layer's dtype: its base weight's, one LoLDU factorizes (str(torch dtype) without "torch.").
LAYER_DTYPES: Tuple[str, ...] = tuple(SPEC["layer_dtypes"])
# An adapter's name matches this whole (re.fullmatch).
ADAPTER_NAME_PATTERN: str = SPEC["adapter_name"]["pattern"]

# -- LoLDUConfig: keys, enums, defaults ------------------------------------------------------------
CONFIG_KEYS: Dict[str, dict] = SPEC["config"]["keys"]
CONFIG_DEFAULTS: Dict[str, object] = {k: v["default"] for k, v in CONFIG_KEYS.items()}
# Keys to_dict leaves out at their default, so files stay readable by loldu versions without them.
OMITTED_AT_DEFAULT: Tuple[str, ...] = tuple(k for k, v in CONFIG_KEYS.items() if v.get("omit_default"))
PEFT_ALIASES: Dict[str, str] = SPEC["config"]["peft_aliases"]
# rank=FULL_RANK: min(d, k) of each adapted layer (the paper's default; Shi et al., arXiv 2410.13618).
FULL_RANK: str = SPEC["config"]["full_rank"]


def enum_values(key: str) -> Tuple[str, ...]:
    """The allowed values of config key `key`, in the spec's order."""
    return tuple(CONFIG_KEYS[key]["values"])


PIVOTINGS = enum_values("pivoting")
FACTOR_DTYPES = enum_values("factor_dtype")
FORMS = enum_values("form")
STORAGES = enum_values("factor_storage")
PARAMETRIZATIONS = enum_values("parametrization")
# PEFT's task types (peft.TaskType), matched in any case (str.upper()); those without a head of their
# own save nothing beside the adapter.
TASK_TYPES = enum_values("task_type")
# target_modules="all-linear" (PEFT's spelling): every nn.Linear / transformers Conv1D but the output head.
ALL_LINEAR: str = SPEC["config"]["all_linear"]
# Heads a task_type implies, trained fully and saved with the adapter (PEFT's defaults).
TASK_HEADS: Dict[str, Tuple[str, ...]] = {k: tuple(v) for k, v in SPEC["config"]["task_heads"].items()}

# -- dtypes ----------------------------------------------------------------------------------------
DTYPES: Tuple[dict, ...] = tuple(SPEC["dtypes"])
DTYPE_SIZES: Dict[str, int] = {d["safetensors"]: d["size"] for d in DTYPES}
# safetensors name -> str(torch dtype), as the data hash spells it.
TORCH_NAMES: Dict[str, str] = {d["safetensors"]: "torch." + d["torch"] for d in DTYPES}
TORCH_DTYPES: Dict[str, torch.dtype] = {d["safetensors"]: getattr(torch, d["torch"]) for d in DTYPES}
SAFETENSORS_NAMES: Dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
# Storage dtypes of the frozen factors, by their config name.
FACTOR_TORCH_DTYPES: Dict[str, torch.dtype] = {n: getattr(torch, n) for n in FACTOR_DTYPES}

# -- the tensors of an adapter file ------------------------------------------------------------------
SAVED_PREFIX: str = SPEC["tensors"]["saved_prefix"]  # tensor t of saved module m is stored as "saved.<m>.<t>"
TENSOR_NAMES: Tuple[str, ...] = tuple(t["name"] for t in SPEC["tensors"]["table"])
TENSOR_DTYPES: Dict[str, torch.dtype] = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in SPEC["tensors"]["table"]}
# Every dtype a tensor may be stored in (z and sigma: also F64, for layers trained in fp64); those in
# SAME_DTYPE share one dtype.
TENSOR_ALLOWED_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {
    t["name"]: tuple(TORCH_DTYPES[d] for d in t.get("dtypes", [t["dtype"]])) for t in SPEC["tensors"]["table"]}
SAME_DTYPE: Tuple[str, ...] = tuple(SPEC["tensors"]["same_dtype"])


def tensor_shapes(ranks: Sequence[int], version: int = FORMAT_VERSION) -> Dict[str, Tuple[int, ...]]:
    """The shape of each adapter tensor for layers of ranks `ranks` in format `version`: from
    RAGGED_FROM {"z": (R,), ...} with R = sum(ranks); before it {"z": (L, r), ...} (one rank r)."""
    ragged = version >= RAGGED_FROM
    if not ragged and len(set(ranks)) > 1:
        raise ValueError(f"format {version} holds one rank for all layers, got ranks {sorted(set(ranks))}")
    dims = {"L": len(ranks), "R": sum(ranks), "r": ranks[0] if ranks else 0}
    key = "shape" if ragged else "shape_before_ragged"
    return {t["name"]: tuple(dims[s] if isinstance(s, str) else s for s in t.get(key, t["shape"]))
            for t in SPEC["tensors"]["table"]}


def tensor_table(ranks: Sequence[int], version: int = FORMAT_VERSION) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """{name: (torch dtype, shape)} of the adapter's own tensors (saved modules' tensors aside)."""
    shapes = tensor_shapes(ranks, version)
    return {name: (TENSOR_DTYPES[name], shapes[name]) for name in TENSOR_NAMES}


# -- coefficients ----------------------------------------------------------------------------------
COEFFICIENT_FORMULAS: Dict[str, str] = {p: SPEC["coefficients"][p] for p in PARAMETRIZATIONS}
COEFFICIENT_VECTORS: Tuple[dict, ...] = tuple(SPEC["coefficients"]["vectors"])
# Every c_i must be finite and at most this in magnitude (SPEC["coefficients"]["c_check"]).
C_ABS_MAX: float = float(SPEC["coefficients"]["c_abs_max"])
