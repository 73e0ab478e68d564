"""Saving and loading one adapter: `adapter_config.json` + `adapter_model.safetensors` (no pickle).

An adapter file holds, per layer, z (r,), sigma, the r pivot indices and a fingerprint of the base
weight; nothing of size d or k (LOLDU.md, fact 6). The frozen factors are re-derived on load from
the base weights and the stored pivots, after checking the fingerprint.

adapter_model.safetensors: one row per layer, in the order of `layers` in adapter_config.json:
    z (L, r) fp32 | sigma (L,) fp32 | pivots (L, r) int32 | fingerprint (L, 32) uint8 (sha256)
and metadata holding the sha256 of adapter_config.json and of the tensor data, so a corrupted or
mismatched pair of files is refused. The fingerprint hashes the weight's (d, k) shape, dtype,
W[:, :r] and W[pivots, :]: exactly what the factorization reads.
"""
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import LoLDUConfig
from .errors import AdapterError
from .layer import weight_matrix
from .model import (
    _check_compatible, _check_name, adapted_layers, build_layers, commit, factorize, find_targets,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loldu-adapter"
FORMAT_VERSION = 1
# Pivots are row indices of a (d, k) weight: int32 on disk halves their share of the file.
_TENSORS = {"z": torch.float32, "sigma": torch.float32, "pivots": torch.int32, "fingerprint": torch.uint8}


def fingerprint(W: torch.Tensor, pivots: torch.Tensor) -> bytes:
    """sha256 of W's (d, k) shape, dtype, W[:, :r] and W[pivots, :] (r = len(pivots)), 32 bytes.

    Reads only what the factorization reads, so it costs O((d + k) r), and a base that would give
    different frozen factors gives a different fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"loldu-fp1|{tuple(W.shape)}|{str(W.dtype)}|".encode())
    r = pivots.shape[0]
    for part in (W[:, :r], W.index_select(0, pivots.to(W.device))):
        h.update(part.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _data_hash(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dumps(header: dict) -> str:
    """Indented JSON with one compact line per layer: readable, and small for 100+ layers."""
    top = json.dumps({k: v for k, v in header.items() if k != "layers"}, indent=1)
    rows = ",\n".join("  " + json.dumps(e, separators=(", ", ": ")) for e in header["layers"])
    return top[:-2] + ',\n "layers": [\n' + rows + "\n ]\n}\n"


def _file_mode() -> int:
    """The mode open() would give a new file: 0o666 minus the process umask (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_paths(paths: Sequence) -> Iterator[List[str]]:
    """Temporary files next to each of `paths`, for the body to write (by name).

    They are created with the mode a plain open() would give them (0o666 & ~umask). When the body
    returns, they are renamed over `paths` back to back (after every file is complete); when it
    raises, they are removed and the targets are untouched. Used for every file loldu writes.
    """
    paths = [Path(p) for p in paths]
    tmps: List[str] = []
    try:
        mode = _file_mode()
        for p in paths:
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            tmps.append(tmp)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        yield tmps
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(files: Dict) -> None:
    """Writes {path: bytes}: every file to a fsynced temporary file first, then all renamed into place."""
    items = list(files.items())
    with atomic_paths([p for p, _ in items]) as tmps:
        for tmp, (_, data) in zip(tmps, items):
            _write_synced(tmp, data)


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> Dict[str, int]:
    """Writes adapter `adapter_name` (default: the active one) of `model` into `directory`.

    Both files are written to temporary files in `directory` and fsynced, then renamed over the
    targets back to back (weights first); the config records the weights' hash.
    Returns {file name: size in bytes}. Raises AdapterError if the model is merged.
    """
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"loldu.save_adapter({str(directory)!r}): the model has no LoLDU layers")
    first = layers[0][1]
    name = adapter_name or first.active_adapter
    if name not in first.loldu_z:
        raise AdapterError(f"loldu.save_adapter({str(directory)!r}): no adapter {name!r}; adapters are {list(first.loldu_z)}")
    for n, layer in layers:
        if layer.merged_adapter is not None:
            raise AdapterError(f"loldu.save_adapter({str(directory)!r}): layer '{n}' is merged, so its base "
                               "weight cannot be fingerprinted; call loldu.unmerge first")
    config: LoLDUConfig = first.configs[name]
    entries, z, sigma, piv, fps = [], [], [], [], []
    for n, layer in layers:
        W = layer.base_matrix()
        entries.append({"name": n, "kind": layer.kind, "shape": list(W.shape), "dtype": str(W.dtype).replace("torch.", "")})
        z.append(layer.loldu_z[name].detach().float().cpu())
        sigma.append(layer.loldu_sigma[name].detach().float().cpu().reshape(()))
        piv.append(layer.loldu_pivots.cpu())
        fps.append(torch.frombuffer(bytearray(fingerprint(W, layer.loldu_pivots)), dtype=torch.uint8))
    tensors = {"z": torch.stack(z), "sigma": torch.stack(sigma), "pivots": torch.stack(piv).to(torch.int32), "fingerprint": torch.stack(fps)}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter_name": name,
              "config": config.to_dict(), "data_sha256": _data_hash(tensors), "layers": entries}
    config_bytes = _dumps(header).encode()
    weights_bytes = st_save(tensors, metadata={"format": "pt", "loldu_format": f"{FORMAT}/{FORMAT_VERSION}",
                                               "config_sha256": hashlib.sha256(config_bytes).hexdigest()})
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Both files are complete and fsynced before either is renamed: a failed write keeps the old pair.
    write_atomic({d / WEIGHTS_NAME: weights_bytes, d / CONFIG_NAME: config_bytes})
    return {WEIGHTS_NAME: len(weights_bytes), CONFIG_NAME: len(config_bytes)}


def _st_metadata(raw: bytes, path: Path) -> dict:
    if len(raw) < 8:
        raise AdapterError(f"{path}: truncated safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise AdapterError(f"{path}: safetensors header length {n} exceeds the file size {len(raw)}")
    try:
        meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    except (ValueError, AttributeError) as e:
        raise AdapterError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: corrupted safetensors metadata")
    return meta


def read_adapter(directory) -> Tuple[dict, LoLDUConfig, Dict[str, torch.Tensor]]:
    """Reads and fully checks both files: (header, config, tensors). Touches no model.

    Raises AdapterError naming the file on a missing, corrupted or mismatched file.
    """
    d = Path(directory)
    cpath, wpath = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cpath, wpath):
        if not p.is_file():
            raise AdapterError(f"{p}: no such adapter file")
    config_bytes, raw = cpath.read_bytes(), wpath.read_bytes()
    try:
        header = json.loads(config_bytes)
    except ValueError as e:
        raise AdapterError(f"{cpath}: not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AdapterError(f"{cpath}: not a loldu adapter config (format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{cpath}: format_version {header.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        config = LoLDUConfig.from_dict(header.get("config"))
    except (AdapterError, TypeError) as e:
        raise AdapterError(f"{cpath}: invalid config: {e}") from None
    layers = header.get("layers")
    ok = isinstance(layers, list) and layers and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("kind"), str)
        and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list) and len(e["shape"]) == 2
        and all(isinstance(s, int) and s > 0 for s in e["shape"]) for e in layers)
    if not ok:
        raise AdapterError(f"{cpath}: 'layers' must be a non-empty list of {{name, kind, shape [d, k], dtype}}")
    names = [e["name"] for e in layers]
    if len(set(names)) != len(names):
        raise AdapterError(f"{cpath}: repeated layer names")
    meta = _st_metadata(raw, wpath)
    if meta.get("config_sha256") != hashlib.sha256(config_bytes).hexdigest():
        raise AdapterError(f"{wpath}: does not belong to {cpath} (config hash mismatch): the pair is corrupted or mixed up")
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{wpath}: corrupted safetensors file ({e})") from None
    if set(tensors) != set(_TENSORS):
        raise AdapterError(f"{wpath}: expected tensors {sorted(_TENSORS)}, found {sorted(tensors)}")
    L, r = len(layers), config.rank
    shapes = {"z": (L, r), "sigma": (L,), "pivots": (L, r), "fingerprint": (L, 32)}
    for key, dt in _TENSORS.items():  # before hashing: a 0-dim tensor cannot be viewed as bytes
        t = tensors[key]
        if t.dtype != dt or tuple(t.shape) != shapes[key]:
            raise AdapterError(f"{wpath}: tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dt} {shapes[key]} "
                               f"({L} layers, rank {r})")
    if header.get("data_sha256") != _data_hash(tensors):
        raise AdapterError(f"{wpath}: tensor data does not match the hash in {cpath}: the file is corrupted")
    tensors["pivots"] = tensors["pivots"].long()  # loldu.ldu's index dtype
    if not (torch.isfinite(tensors["z"]).all() and torch.isfinite(tensors["sigma"]).all()):
        raise AdapterError(f"{wpath}: z or sigma holds NaN/Inf")
    for i, e in enumerate(layers):
        p = tensors["pivots"][i]
        if int(p.min()) < 0 or int(p.max()) >= e["shape"][0] or p.unique().numel() != r:
            raise AdapterError(f"{wpath}: layer '{e['name']}': pivots must be {r} distinct rows in [0, {e['shape'][0]})")
    return header, config, tensors


def _check_layer(entry: dict, module_name: str, module: nn.Module, kind: str, W: torch.Tensor,
                 pivots: torch.Tensor, fp: torch.Tensor, where: str) -> None:
    if entry["kind"] != kind:
        raise AdapterError(f"{where}: layer '{module_name}' is a {kind} layer in the model but {entry['kind']} in the file")
    if list(W.shape) != entry["shape"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight {tuple(W.shape)} in the model but "
                           f"{tuple(entry['shape'])} in the file")
    if str(W.dtype).replace("torch.", "") != entry["dtype"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight dtype {W.dtype} in the model but {entry['dtype']} in the file")
    if fingerprint(W, pivots) != bytes(fp.tolist()):
        raise AdapterError(f"{where}: layer '{module_name}': the base weight's fingerprint differs from the one the "
                           "adapter was trained on (a different base model or checkpoint)")


def load_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None, *,
                 progress: Optional[bool] = None) -> nn.Module:
    """Loads an adapter saved by save_adapter into `model` and returns it (edited in place).

    A plain base model is injected from the stored config, and the loaded adapter is active. On an
    already injected model the adapter is added under `adapter_name` (default: its stored name), not
    activated (loldu.set_adapter). Frozen factors come from the base weights and the stored pivots.
    Everything is checked first; on any AdapterError (naming the file and layer) the model is unchanged.
    """
    header, config, tensors = read_adapter(directory)
    where = str(Path(directory) / CONFIG_NAME)
    name = adapter_name or header.get("adapter_name") or "default"
    _check_name(name)
    entries = {e["name"]: (i, e) for i, e in enumerate(header["layers"])}
    existing = adapted_layers(model)

    if not existing:
        try:
            targets = find_targets(model, config)
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None
        present = {n for n, _, _ in targets}
        _missing_extra(entries, present, where)
        for n, module, kind in targets:
            i, e = entries[n]
            _check_layer(e, n, module, kind, weight_matrix(module), tensors["pivots"][i], tensors["fingerprint"][i], where)
        pivots = {n: tensors["pivots"][entries[n][0]] for n in present}
        try:
            factors = factorize(targets, config, pivots=pivots, progress=progress)
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None
        layers = build_layers(targets, factors, config)
        for n, layer in layers.items():
            i = entries[n][0]
            layer.add_adapter(name, config, z=tensors["z"][i], sigma=tensors["sigma"][i])
        commit(model, layers, name)
        return model

    first = existing[0][1]
    if name in first.loldu_z:
        raise AdapterError(f"{where}: the model already has an adapter {name!r}; pass another adapter_name")
    for n, layer in existing:
        if layer.merged_adapter is not None:
            raise AdapterError(f"{where}: layer '{n}' is merged; call loldu.unmerge before loading another adapter")
    try:
        _check_compatible(model, existing, config, "loldu.load_adapter")
    except AdapterError as e:
        raise AdapterError(f"{where}: {e}") from None
    _missing_extra(entries, {n for n, _ in existing}, where)
    for n, layer in existing:
        i, e = entries[n]
        piv = tensors["pivots"][i]
        _check_layer(e, n, layer.base_layer, layer.kind, layer.base_matrix(), piv, tensors["fingerprint"][i], where)
        if not torch.equal(piv, layer.loldu_pivots.cpu()):
            raise AdapterError(f"{where}: layer '{n}': stored pivots differ from the injected layer's pivots, so the "
                               "adapter does not fit its frozen factors")
    for n, layer in existing:
        i = entries[n][0]
        layer.add_adapter(name, config, z=tensors["z"][i], sigma=tensors["sigma"][i])
        layer.set_trainable(layer.active_adapter)
    return model


def _missing_extra(entries: dict, present: set, where: str) -> None:
    missing = [n for n in entries if n not in present]
    if missing:
        raise AdapterError(f"{where}: layer '{missing[0]}' is in the adapter but the model has no such targeted layer "
                           f"({len(missing)} missing)")
    extra = sorted(present - set(entries))
    if extra:
        raise AdapterError(f"{where}: layer '{extra[0]}' is targeted in the model but absent from the adapter "
                           f"({len(extra)} extra)")
