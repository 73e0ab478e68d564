"""The adapter inputs of an export made with adapter_inputs=True: their names, the file metadata that
describes them, and the feeds (each layer's c) from a model or an adapter directory.

Shared by the exporter (onnx_export) and the runner (ort_runner), and importing neither.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from loldu.adapter_io import read_adapter
from loldu.errors import AdapterError, ExportError
from loldu.layer import coefficients_from
from loldu.state import AdapterState

C_PREFIX = "loldu.c."
META_KEY = "loldu.adapter_inputs"


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


def adapter_metadata(onnx_model) -> List[dict]:
    """The per-layer records (layer, input, rank, pivots, fingerprint, D) of an adapter-inputs export."""
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        proto = onnx_model
    else:
        p = getattr(onnx_model, "path", onnx_model)
        if not Path(str(p)).is_file():
            raise ExportError(f"{p}: no such ONNX file")
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise ExportError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    for entry in proto.metadata_props:
        if entry.key == META_KEY:
            try:
                layers = json.loads(entry.value)["layers"]
            except (ValueError, RecursionError, KeyError, TypeError) as e:
                raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: corrupted loldu adapter metadata "
                                  f"({type(e).__name__})") from None
            if not isinstance(layers, list) or not all(_valid_record(r) for r in layers):
                raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: corrupted loldu adapter metadata "
                                  "(each layer needs layer, input, rank, pivots, fingerprint and D of length rank)")
            return layers
    raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: not exported with adapter_inputs=True "
                      "(no loldu adapter metadata)")


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
        header, config, tensors = read_adapter(source)
    except AdapterError as e:
        raise ExportError(str(e)) from None
    meta = {r["layer"]: r for r in adapter_metadata(onnx_model)}
    names = [e["name"] for e in header["layers"]]
    _check_layers(sorted(names), sorted(meta), f"adapter {source}")
    s0 = config.initial_scale
    feeds = {}
    for i, n in enumerate(names):
        rec = meta[n]
        _check_base(rec, n, tensors["z"].shape[1], bytes(tensors["fingerprint"][i].tolist()).hex(),
                    tensors["pivots"][i].tolist(), f"adapter {source}")
        z, s = tensors["z"][i].float(), tensors["sigma"][i].float()
        D = torch.tensor(rec["D"], dtype=torch.float32)
        feeds[rec["input"]] = coefficients_from(z, s, D, s0, config.parametrization)
    return feeds


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
