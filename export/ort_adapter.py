"""LoLDU adapters as ONNX Runtime adapter files (`.onnx_adapter`), for one adapter-inputs export.

ONNX Runtime's adapter format (onnxruntime.AdapterFormat; ONNX Runtime GenAI's multi-LoRA reads the
same files) holds named tensors that override, for one run, graph inputs that have a default
initializer (RunOptions.add_active_adapter). An export made with adapter_inputs=True has such an
input per adapted layer, `loldu.c.<layer>` with a default of zeros, so an adapter's file holds each
layer's c (r,), in the graph input's dtype, and nothing of size d or k.

Which base: the file's model_version (an int32) is the export's base digest cut to 32 bits
(adapter_inputs.model_version, also in the ONNX file's metadata under `loldu.model_version`); its
adapter_version identifies its numbers (the first 4 bytes of a sha256 of the c values). A file is
refused for a model whose model version, inputs, shapes or dtypes differ.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from loldu.atomic import atomic_write
from loldu.errors import ExportError
from loldu.spec import C_ABS_MAX

from .adapter_inputs import C_PREFIX, adapter_feeds, adapter_metadata, model_version

SUFFIX = ".onnx_adapter"
# {c input name: (numpy dtype, shape, has a default initializer)}
CInputs = Dict[str, Tuple[type, Tuple[int, ...], bool]]


@dataclass
class OrtAdapterReport:
    """What to_ort_adapter wrote."""

    path: str
    bytes: int
    layers: int
    numbers: int
    model_version: int
    adapter_version: int

    def __str__(self) -> str:
        return (f"wrote {self.path} ({self.bytes:,} bytes: c of {self.layers} layers, {self.numbers:,} numbers; "
                f"model version {self.model_version}, adapter version {self.adapter_version})")


def proto_c_inputs(proto) -> CInputs:
    """The c inputs of an ONNX ModelProto, with their dtypes, shapes and whether they have a default."""
    from onnx import helper

    defaults = {t.name for t in proto.graph.initializer}
    out: CInputs = {}
    for i in proto.graph.input:
        if i.name.startswith(C_PREFIX):
            t = i.type.tensor_type
            out[i.name] = (helper.tensor_dtype_to_np_dtype(t.elem_type).type,
                           tuple(d.dim_value for d in t.shape.dim), i.name in defaults)
    return out


def adapter_version(params: Dict[str, np.ndarray]) -> int:
    """The first 4 bytes of a sha256 of the parameters (names, dtypes, values), as a signed int32."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest()[:4], "big", signed=True)


def _model(onnx_path):
    """(a name for messages, what adapter_metadata and adapter_feeds read: a runner or a ModelProto,
    its c inputs). A runner answers from its session, without reading the file again."""
    if getattr(onnx_path, "session", None) is not None and hasattr(onnx_path, "c_inputs"):
        return str(onnx_path.path), onnx_path, onnx_path.c_inputs
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ExportError(f"{p}: no such ONNX file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    return str(p), proto, proto_c_inputs(proto)


def _out_problem(out: Path):
    if out.suffix != SUFFIX:
        return f"must end in {SUFFIX}"
    try:
        if out.is_dir():
            return "is a directory"
        if not out.parent.is_dir():
            return f"cannot be written: directory {str(out.parent)!r} does not exist"
    except OSError as e:
        return f"cannot be written ({type(e).__name__}: {e.strerror or e})"
    return None


def adapter_params(adapter_dir, onnx_path) -> Tuple[Dict[str, np.ndarray], int, str]:
    """({c input: c in the graph's dtype}, the model version, the model's name) of the LoLDU adapter
    directory `adapter_dir` for the adapter-inputs export `onnx_path` (a file or an OrtRunner).
    ExportError naming both if the model has no c inputs (with defaults) or the adapter was trained
    on another base (other layers, ranks, pivots or base-weight fingerprints)."""
    label, model, cin = _model(onnx_path)
    both = f"adapter {adapter_dir} for model {label}"
    try:
        records = adapter_metadata(model)
    except ExportError as e:
        raise ExportError(f"{both}: the model has no c inputs ({e}); export it with merge=False, "
                          "adapter_inputs=True") from None
    if not cin:
        raise ExportError(f"{both}: the model has no c inputs (loldu.c.*); export it with merge=False, "
                          "adapter_inputs=True")
    no_default = [n for n, (_, _, has) in cin.items() if not has]
    if no_default:
        raise ExportError(f"{both}: the model's c input {no_default[0]!r} has no default value, so ONNX Runtime "
                          "cannot override it with an adapter (exported by an older loldu): export it again")
    try:
        feeds = adapter_feeds(adapter_dir, model)
    except ExportError as e:
        raise ExportError(f"{both}: {e}") from None
    params = {}
    for name, c in feeds.items():
        dtype, shape, _ = cin[name]
        a = c.numpy().astype(dtype)
        if tuple(a.shape) != tuple(shape) or not np.isfinite(a).all():
            raise ExportError(f"{both}: c of input {name!r} (shape {list(a.shape)}) does not fit the model's "
                              f"{list(shape)} {np.dtype(dtype).name} input")
        params[name] = a
    return params, model_version(records), label


def write_params(params: Dict[str, np.ndarray], version: int, out_path) -> OrtAdapterReport:
    """Writes an .onnx_adapter holding `params`, model version `version`, crash-safely (loldu.atomic)."""
    import onnxruntime as ort

    out = Path(out_path)
    av = adapter_version(params)
    fmt = ort.AdapterFormat()
    fmt.set_model_version(version)
    fmt.set_adapter_version(av)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in params.items()})
    try:
        with atomic_write([out]) as w:
            tmp = w.temps[0]
            fmt.export_adapter(tmp)
            back = ort.AdapterFormat.read_adapter(tmp)  # what a reader will see, before the rename
            if sorted(back.get_parameters()) != sorted(params) or back.get_model_version() != version:
                raise ExportError(f"{out}: onnxruntime wrote an adapter file that does not read back; not written")
            size = Path(tmp).stat().st_size
    except OSError as e:
        raise ExportError(f"cannot write {str(out)!r} ({type(e).__name__}: {e}); nothing was written there") from None
    except RuntimeError as e:
        raise ExportError(f"{out}: onnxruntime could not write the adapter ({str(e).strip()[:300]})") from None
    return OrtAdapterReport(str(out), size, len(params), int(sum(a.size for a in params.values())), version, av)


def to_ort_adapter(adapter_dir, onnx_path, out_path) -> OrtAdapterReport:
    """Writes the LoLDU adapter directory `adapter_dir` (loldu.save_adapter) as the ONNX Runtime adapter
    file `out_path` (.onnx_adapter) for `onnx_path`, an export made with merge=False,
    adapter_inputs=True (a file, or its OrtRunner): each layer's c in the graph input's dtype.

    Raises ExportError naming both files, leaving `out_path` as it was, if the model has no c inputs
    or the adapter was trained on another base (loldu.export.adapter_feeds' checks); the file is
    written to a temporary beside `out_path` and renamed (loldu.atomic.atomic_write).
    """
    out = Path(out_path)
    problem = _out_problem(out)
    if problem:
        raise ExportError(f"loldu.export.to_ort_adapter: output path {str(out)!r} {problem}")
    params, version, _ = adapter_params(adapter_dir, onnx_path)
    return write_params(params, version, out)


def check_ort_adapter(path, version: int, cin: CInputs, label: str) -> List[str]:
    """Refuses the .onnx_adapter `path` for the model `label` (its model version and c inputs) with an
    ExportError naming both: unreadable, made for another base, or other inputs, shapes or dtypes.
    Returns its parameter names."""
    import onnxruntime as ort

    both = f"adapter file {path} for model {label}"
    if not Path(path).is_file():
        raise ExportError(f"{both}: no such file")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except RuntimeError as e:
        raise ExportError(f"{both}: not an ONNX Runtime adapter file ({str(e).strip().splitlines()[-1][:200]})") from None
    if fmt.get_model_version() != version:
        raise ExportError(f"{both}: made for another base model (its model version {fmt.get_model_version()}, "
                          f"the model's {version}): the adapter was trained on other base weights")
    params = fmt.get_parameters()
    if sorted(params) != sorted(cin):
        extra, missing = sorted(set(params) - set(cin)), sorted(set(cin) - set(params))
        raise ExportError(f"{both}: its tensors do not match the model's c inputs: {len(missing)} missing "
                          f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for name, v in params.items():
        dtype, shape, _ = cin[name]
        want = f"tensor({_ORT_NAMES.get(np.dtype(dtype).name, np.dtype(dtype).name)})"
        if tuple(v.shape()) != tuple(shape) or v.data_type() != want:
            raise ExportError(f"{both}: tensor {name!r} is {v.data_type()} {list(v.shape())}, the model's input "
                              f"is {want} {list(shape)}")
    values = {name: v.numpy() for name, v in params.items()}
    if adapter_version(values) != fmt.get_adapter_version():
        raise ExportError(f"{both}: its c values do not match its adapter version (the file was altered after it "
                          "was written); write it again with loldu.export.to_ort_adapter")
    for name, a in values.items():
        if not np.isfinite(a).all() or np.abs(a.astype(np.float64)).max(initial=0.0) > C_ABS_MAX:
            raise ExportError(f"{both}: tensor {name!r} holds NaN, Inf or |c| > {C_ABS_MAX:g}")
    return sorted(params)


_ORT_NAMES = {"float32": "float", "float64": "double"}
