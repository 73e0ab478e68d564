"""The adapter inputs of an export made with adapter_inputs=True: their names, the file metadata that
describes them, and the feeds (each layer's c) from a model or an adapter directory.

Naming: layer `<name>` (its module path, as loldu.adapted_layers lists it) takes its c (r,) through the
graph input `loldu.c.<name>`; the name depends on the layer alone, so every export of one base names
them alike. Each has a default initializer of zeros (c = 0: the base model's outputs), which makes
it an input that ONNX Runtime's adapters (.onnx_adapter files, loldu.export.to_ort_adapter) override
per run. The file's metadata_props hold the per-layer records (META_KEY), the base fingerprint
(sha256 of the layers' fingerprints, BASE_KEY) and the 32-bit model version an .onnx_adapter made
for this base carries (VERSION_KEY).

Shared by the exporter (onnx_export), the runner (ort_runner) and ort_adapter, and importing none of them.
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from loldu.adapter_io import read_adapter
from loldu.errors import AdapterError, ExportError
from loldu.layer import coefficients_from
from loldu.state import AdapterState

C_PREFIX = "loldu.c."
META_KEY = "loldu.adapter_inputs"
BASE_KEY = "loldu.base_fingerprint"
VERSION_KEY = "loldu.model_version"


def base_digest(records: List[dict]) -> bytes:
    """sha256 of the layers' base fingerprints in the records' order (that of loldu.adapted_layers):
    one number for "the base weights these adapters were trained on"."""
    return hashlib.sha256(b"".join(bytes.fromhex(r["fingerprint"]) for r in records)).digest()


def model_version(records: List[dict]) -> int:
    """The base digest's first 4 bytes as a signed int32: what an .onnx_adapter's model_version field
    (an int32 in ONNX Runtime's adapter format) can hold of it."""
    return int.from_bytes(base_digest(records)[:4], "big", signed=True)


def add_serving_defaults(proto, c_names: List[str]) -> None:
    """Gives each c input of an adapter-inputs export a default initializer of zeros (its dtype and
    shape), so that without an adapter the graph computes the base model, and records the base
    fingerprint and model version beside the per-layer metadata."""
    from onnx import helper, numpy_helper

    graph_inputs = {i.name: i for i in proto.graph.input}
    have = {t.name for t in proto.graph.initializer}
    for name in c_names:
        if name in have or name not in graph_inputs:
            continue
        t = graph_inputs[name].type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
    records = adapter_metadata(proto)
    for key, value in ((BASE_KEY, base_digest(records).hex()), (VERSION_KEY, str(model_version(records)))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def metadata_json(layers: List[Tuple[str, nn.Module]]) -> str:
    """The file metadata of an adapter-inputs export: each layer's c input, rank, pivots, D and the
    fingerprint of the base weight it was trained on (what adapter_feeds checks an adapter against)."""
    rows = []
    for name, layer in layers:
        rows.append({"layer": name, "input": C_PREFIX + name, "rank": layer.rank,
                     "pivots": layer.loldu_pivots.tolist(),
                     # W0's, recorded before an "lu" layer's LU (or its copy's recomputed W0) replaced it.
                     "fingerprint": layer.base_fingerprint().hex(),
                     # fp32 values printed by Python's repr round-trip exactly.
                     "D": [float(v) for v in layer.loldu_D.float().cpu()]})
    return json.dumps({"format": "loldu-onnx-adapter-inputs", "version": 1, "layers": rows})


def _valid_record(r) -> bool:
    """One layer's record as to_onnx writes it, with every field of the right type and length."""
    if not isinstance(r, dict) or not isinstance(r.get("layer"), str) or not isinstance(r.get("input"), str):
        return False
    rank, piv, d = r.get("rank"), r.get("pivots"), r.get("D")
    return (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 and isinstance(r.get("fingerprint"), str)
            and isinstance(piv, list) and len(piv) == rank and all(isinstance(i, int) for i in piv)
            and isinstance(d, list) and len(d) == rank
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d))


def _metadata_map(onnx_model) -> Tuple[str, Dict[str, str]]:
    """(a name for messages, {key: value} of the model's metadata_props). A runner (anything with an
    ONNX Runtime `session`) answers from its session, without reading the file again."""
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        return "the ONNX model", {e.key: e.value for e in onnx_model.metadata_props}
    session = getattr(onnx_model, "session", None)
    p = str(getattr(onnx_model, "path", onnx_model))
    if session is not None:
        return p, dict(session.get_modelmeta().custom_metadata_map)
    if not Path(p).is_file():
        raise ExportError(f"{p}: no such ONNX file")
    try:
        proto = onnx.load(p, load_external_data=False)
    except Exception as e:
        raise ExportError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    return p, {e.key: e.value for e in proto.metadata_props}


def adapter_metadata(onnx_model) -> List[dict]:
    """The per-layer records (layer, input, rank, pivots, fingerprint, D) of an adapter-inputs export:
    an ONNX file, a ModelProto or an OrtRunner."""
    label, meta = _metadata_map(onnx_model)
    if META_KEY not in meta:
        raise ExportError(f"{label}: not exported with adapter_inputs=True (no loldu adapter metadata)")
    try:
        layers = json.loads(meta[META_KEY])["layers"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise ExportError(f"{label}: corrupted loldu adapter metadata ({type(e).__name__})") from None
    if not isinstance(layers, list) or not all(_valid_record(r) for r in layers):
        raise ExportError(f"{label}: corrupted loldu adapter metadata "
                          "(each layer needs layer, input, rank, pivots, fingerprint and D of length rank)")
    return layers


def adapter_feeds(source, onnx_model=None, *, adapter_name: Optional[str] = None) -> Dict[str, "torch.Tensor"]:
    """{`loldu.c.<layer>`: c (r,) fp32 CPU tensor} for an export made with adapter_inputs=True.

    source: a model with LoLDU layers (adapter `adapter_name`, default the active one), or an adapter
        directory written by loldu.save_adapter; a directory needs `onnx_model` (the exported file,
        its OrtRunner or ModelProto), whose metadata holds each layer's D and base fingerprint.
    c as loldu.layer.coefficients_from computes it in the adapter's parametrization, exactly as the
    PyTorch layers do.
    Raises ExportError if the adapter does not fit the export (other layers, rank or base weights).
    """
    if isinstance(source, nn.Module):
        state = AdapterState.of(source).require_layers("loldu.export.adapter_feeds", ExportError)
        layers = state.layers
        name = adapter_name or state.active
        state.require_exists(name, "loldu.export.adapter_feeds", ExportError)
        feeds = {C_PREFIX + n: layer.coefficients(name).detach().float().cpu() for n, layer in layers}
        if onnx_model is not None:
            meta = {r["layer"]: r for r in adapter_metadata(onnx_model)}
            _check_layers(sorted(n for n, _ in layers), sorted(meta), "the model's adapter")
            for n, layer in layers:
                _check_base(meta[n], n, layer.rank, layer.base_fingerprint().hex(),
                            layer.loldu_pivots.tolist(), "the model's adapter")
        return feeds
    if onnx_model is None:
        raise ExportError("loldu.export.adapter_feeds: an adapter directory needs onnx_model (the exported file)")
    try:
        stored = read_adapter(source)
    except AdapterError as e:
        raise ExportError(str(e)) from None
    header, config = stored[0], stored[1]
    meta = {r["layer"]: r for r in adapter_metadata(onnx_model)}
    names = [e["name"] for e in header["layers"]]
    _check_layers(sorted(names), sorted(meta), f"adapter {source}")
    feeds = {}
    for i, n in enumerate(names):
        rec, t = meta[n], _stored_layer(stored, i)
        rank = t["z"].shape[0]
        _check_base(rec, n, rank, bytes(t["fingerprint"].tolist()).hex(), t["pivots"].tolist(), f"adapter {source}")
        D = torch.tensor(rec["D"], dtype=torch.float32)
        # sigma0 per layer: alpha / r differs between layers of different ranks (rank="full")
        feeds[rec["input"]] = coefficients_from(t["z"].float(), t["sigma"].float(), D, config.scale_for(n, rank),
                                                config.parametrization)
    return feeds


def _stored_layer(stored, i: int) -> Dict[str, torch.Tensor]:
    """Layer i's z (r,), sigma (), pivots (r,) and fingerprint (32,) of an adapter as read_adapter
    returns it: its `layer(i)` where the reader splits layers of their own ranks, else row i."""
    if hasattr(stored, "layer"):
        return stored.layer(i)
    return {k: stored[2][k][i] for k in ("z", "sigma", "pivots", "fingerprint")}


def _check_base(rec: dict, name: str, rank: int, fp_hex: str, pivots: List[int], what: str) -> None:
    """The adapter's layer `name` must have the rank, base-weight fingerprint and pivots the export recorded."""
    if rank != rec["rank"]:
        raise ExportError(f"{what}: rank {rank} but the export's layer '{name}' has rank {rec['rank']}")
    if fp_hex != rec["fingerprint"] or pivots != rec["pivots"]:
        raise ExportError(f"{what}: layer '{name}' was trained on a different base weight than the "
                          "exported model (fingerprint mismatch)")


def _check_layers(have: List[str], want: List[str], what: str) -> None:
    if have != want:
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise ExportError(f"{what} does not match the export's adapter inputs: "
                          f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
