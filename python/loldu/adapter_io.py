"""Saving and loading one adapter: `adapter_model.safetensors` (+ its readable copy `loldu_config.json`), no pickle.

An adapter file holds, per layer, z (r,), sigma, the r pivot indices and a fingerprint of the base
weight; nothing of size d or k (docs/method.md §2). The frozen factors are re-derived on load from
the base weights and the stored pivots, after checking the fingerprint.

Format 2: adapter_model.safetensors alone is the whole adapter. Its tensors (the tensor table of
loldu/adapter_spec.json, which the checks read), one row per layer in the order of the config's `layers`:
    z (L, r) fp32 | sigma (L,) fp32 | pivots (L, r) int32 | fingerprint (L, 32) uint8 (sha256)
(z and sigma in fp64, both, when the layers trained them in fp64; every c_i they give must be
finite and within the spec's c_abs_max, checked at save and at load).
Its metadata: `loldu_format` ("loldu-adapter/2"), `loldu_config` (the config JSON text: adapter
name, LoLDUConfig, per layer name/kind/shape/dtype, and the sha256 of the tensor data) and
`loldu_config_sha256` (the sha256 of that text), so a flipped bit in the config or the tensors is refused.
The readable copy is a byte-identical copy of `loldu_config`, for people and tools; the loader
does not need it, and ignores it with one AdapterWarning when it differs (left stale by an
interrupted save, or edited by hand). The fingerprint hashes the weight's (d, k) shape, dtype,
W[:, :r] and W[pivots, :]: exactly what the factorization reads.
Format 3 adds the modules trained fully beside the adapter (modules_to_save, task heads):
each tensor t of saved module m is stored as `saved.<m>.<t>` in its own dtype, the config lists them
as `saved_modules` [{name, tensors}], and the readable copy is named loldu_config.json (PEFT's tools
look for adapter_config.json, and find none: this is not a PEFT adapter; a stale loldu
adapter_config.json of an older format is removed by the next save).
Format 4 (written) gives each layer its own rank (rank="full", rank_pattern): each layer entry
holds its "rank", and z and pivots are the layers' vectors concatenated in layer order, z (R,) and
pivots (R,) with R the sum of the ranks (the same bytes as (L, r) when every rank is r).
Formats 3, 2 (the same without saved modules, its copy named adapter_config.json) and 1 (the config
read from adapter_config.json, whose sha256 the weights' metadata records) are still read; in
memory (AdapterFile) their z and pivots are flattened the same way and each layer gets its rank.

Crash safety (loldu/atomic.py): save_adapter writes both files through one atomic_write, the
weights file first, so its rename is the single atomic commit and the config copy follows. Killed
at any moment, the directory loads as exactly the old or exactly the new adapter. A target that
cannot be replaced (a directory in its place) is refused before anything is written; a config copy
that still cannot be renamed after the commit leaves the save successful, with an AdapterWarning
(the copy is stale, which load_adapter tolerates).
"""
import contextlib
import gc
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter_files import check_layers, check_ranks, check_table
from .adapter_files import metadata_of as _metadata_of
from .adapter_files import os_reason as _os_reason
from .adapter_files import read_config_file as _read_config
from .adapter_files import read_weights as _read_bytes  # the weights file, read once (tests count the calls)
from .adapter_files import read_weights_head as _read_head
from .adapter_files import require_unicode as _require_unicode
from .adapter_files import same_copy as _copy_matches
from .atomic import STALE_EMPTY_SECONDS, STALE_UNLOCKED_SECONDS, atomic_write, clean_stale_temps, read_regular
from .config import TASK_HEADS, LoLDUConfig
from .errors import AdapterError, LolduWarning
from .integrity import c_terms_refusal, check_values, fingerprint, stale_refusal
from .layer import weight_matrix
from .model import add_with, inject_with
from .spec import (
    ADAPTER_NAME_PATTERN,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_CONFIG_NAME,
    META_CONFIG,
    META_CONFIG_SHA256,
    META_FORMAT,
    META_V1_CONFIG_SHA256,
    READABLE_VERSIONS,
    SAME_DTYPE,
    SAVED_PREFIX,
    TENSOR_DTYPES,
    TENSOR_NAMES,
    VERSION_MAX_DIGITS,
    WEIGHTS_NAME,
)
from .state import AdapterState, unwrap

# The format's names and tensor table come from the spec (loldu/adapter_spec.json); the crash-safe
# writer's names stay importable from here.
__all__ = ["save_adapter", "read_adapter", "load_adapter", "AdapterFile", "AdapterWarning", "fingerprint",
           "CONFIG_NAME", "LEGACY_CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS",
           "SAVED_PREFIX", "atomic_paths", "clean_stale_temps", "STALE_EMPTY_SECONDS", "STALE_UNLOCKED_SECONDS"]


@contextlib.contextmanager
def atomic_paths(paths: Sequence) -> Iterator[List[str]]:
    """loldu.atomic.atomic_write's temporary files by name, for callers that write them themselves and
    want every rename to raise on failure (loldu.export writes one file)."""
    with atomic_write(paths) as w:
        yield w.temps
    if w.late:
        raise w.late[0][1]


class AdapterWarning(LolduWarning):
    """load_adapter ignored a readable config copy (loldu_config.json; adapter_config.json in format 2)
    that differs from the config in the weights file, or save_adapter committed the adapter but could
    not replace loldu_config.json (its readable copy)."""


def _as_path(directory, what: str) -> Path:
    """`directory` (str or os.PathLike) as a Path; AdapterError for anything else or a NUL byte."""
    if isinstance(directory, bytes) or not isinstance(directory, (str, os.PathLike)):
        raise AdapterError(f"{what}: the adapter directory must be a str or os.PathLike, got {type(directory).__name__}")
    try:
        d = Path(directory)
    except TypeError as e:  # an os.PathLike whose __fspath__ gives bytes
        raise AdapterError(f"{what}: the adapter directory must be a str path ({e})") from None
    if "\0" in str(d):
        raise AdapterError(f"{what}: the adapter directory {str(d)!r} contains a NUL byte, which no file name can hold")
    return d


def _data_hash(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dumps(header: dict) -> str:
    """Indented JSON with one compact line per layer: readable, and small for 100+ layers."""
    top = json.dumps({k: v for k, v in header.items() if k not in ("layers", "saved_modules")}, indent=1)
    text = top[:-2]
    for key in ("layers", "saved_modules"):
        if key in header:
            rows = ",\n".join("  " + json.dumps(e, separators=(", ", ": ")) for e in header[key])
            text += f',\n "{key}": [' + ("\n" + rows + "\n " if rows else "") + "]"
    return text + "\n}\n"


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> Dict[str, int]:
    """Writes adapter `adapter_name` (default: the active one) of `model` into `directory`.

    adapter_model.safetensors holds the whole adapter (config included) and is committed by one
    atomic rename; loldu_config.json, a readable copy of its config, follows. Killed at any moment, the
    directory loads as the old adapter or the new one (see the module docstring).
    Returns {file name: size in bytes} of the files written. Raises AdapterError if the model is
    merged, if a layer's z or sigma holds NaN/Inf or gives a c beyond the spec's bound, or its base
    weight changed in place after its frozen factors were derived (naming the layer), and naming the directory when
    it cannot be created or written (a directory in the way of a file included); the adapter there
    before, if any, is then unchanged. If adapter_model.safetensors was committed but
    loldu_config.json (the readable copy) then cannot be replaced, the save succeeds with an
    AdapterWarning and the returned dict lacks that file: the directory loads as the new adapter,
    and load_adapter warns about the stale copy until the next save rewrites it.
    """
    d = _as_path(directory, "loldu.save_adapter")
    what = f"loldu.save_adapter({str(directory)!r})"
    state = AdapterState.of(model).require_layers(what)
    name = adapter_name or state.active
    state.require_exists(name, what)
    state.require_unmerged(what, "is merged, so its base weight cannot be fingerprinted")
    config = state.config(name)
    entries, tensors = _layer_table(state, name, what)
    _warn_unsaved_trainables(state, what)
    saved_entries = []
    for n, m in state.saved:
        sd = m.modules_to_save[name].state_dict()
        for key, t in sd.items():
            t = t.detach().cpu().contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{what}: saved module '{n}': adapter {name!r} holds NaN/Inf in '{key}' (training "
                                   "diverged); nothing was written")
            tensors[f"{SAVED_PREFIX}{n}.{key}"] = t
        saved_entries.append({"name": n, "tensors": list(sd)})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter_name": name,
              "model_class": type(state.root).__name__, "config": config.to_dict(),
              "data_sha256": _data_hash(tensors), "layers": entries, "saved_modules": saved_entries}
    config_text = _dumps(header)
    config_bytes = config_text.encode()
    weights_bytes = st_save(tensors, metadata={"format": "pt", META_FORMAT: f"{FORMAT}/{FORMAT_VERSION}",
                                               META_CONFIG: config_text,
                                               META_CONFIG_SHA256: hashlib.sha256(config_bytes).hexdigest()})
    try:
        if d.exists() and not d.is_dir():
            raise AdapterError(f"loldu.save_adapter: {str(d)!r} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterError(f"loldu.save_adapter: cannot create the adapter directory {str(d)!r} "
                           f"({_os_reason(e)})") from None
    try:
        # The weights file is the commit: renamed first, it alone is a complete adapter.
        with atomic_write([d / WEIGHTS_NAME, d / CONFIG_NAME]) as w:
            w.write(0, weights_bytes)
            w.write(1, config_bytes)
    except OSError as e:
        raise AdapterError(f"loldu.save_adapter: cannot write the adapter into {str(d)!r} ({_os_reason(e)}); "
                           "the adapter there before, if any, is unchanged") from None
    written = {WEIGHTS_NAME: len(weights_bytes), CONFIG_NAME: len(config_bytes)}
    _remove_legacy_copy(d)
    for path, e in w.late:
        written.pop(path.name)
        warnings.warn(f"loldu.save_adapter: the adapter was saved into {str(d)!r} ({WEIGHTS_NAME} holds all of it), "
                      f"but its readable copy {path.name} could not be replaced ({_os_reason(e)}); it is stale until "
                      "the next save", AdapterWarning, stacklevel=2)
    return written


def _layer_table(state: AdapterState, name: str, what: str) -> Tuple[List[dict], Dict[str, torch.Tensor]]:
    """The `layers` entries and the adapter's own tensors (spec.tensor_table) of adapter `name`;
    AdapterError naming the layer when its z or sigma holds NaN/Inf, its c breaks the spec's bound
    (integrity.c_terms_refusal) or its frozen factors are stale (integrity.stale_refusal). z and
    sigma are stored in fp64 when a layer trained them in fp64 (the spec's F64), else in fp32."""
    config = state.config(name)
    entries, z, sigma, piv, fps = [], [], [], [], []
    for n, layer in state.layers:
        W = layer.base_matrix()
        dtype = str(layer.store.base_dtype(layer)).replace("torch.", "")  # W0's, also where a store keeps W0 as its LU
        entries.append({"name": n, "kind": layer.kind, "shape": list(W.shape), "dtype": dtype, "rank": layer.rank})
        z.append(layer.loldu_z[name].detach().cpu())
        sigma.append(layer.loldu_sigma[name].detach().cpu().reshape(()))
        if not (torch.isfinite(z[-1]).all() and torch.isfinite(sigma[-1])):
            raise AdapterError(f"{what}: layer '{n}': adapter {name!r} holds NaN/Inf in z or sigma (training diverged); "
                               "nothing was written (load_adapter would refuse such a file)")
        why = c_terms_refusal(z[-1], sigma[-1], layer.sigma0[name], config.parametrization) or stale_refusal(layer)
        if why is not None:
            raise AdapterError(f"{what}: layer '{n}': adapter {name!r}: {why}; nothing was written")
        piv.append(layer.loldu_pivots.cpu())
        fps.append(torch.frombuffer(bytearray(layer.base_fingerprint()), dtype=torch.uint8))
    wide = torch.float64 if any(t.dtype == torch.float64 for t in z + sigma) else torch.float32
    stacked = {"z": torch.cat([t.to(wide) for t in z]), "sigma": torch.stack([t.to(wide) for t in sigma]),
               "pivots": torch.cat(piv), "fingerprint": torch.stack(fps)}
    return entries, {key: stacked[key] if key in SAME_DTYPE else stacked[key].to(TENSOR_DTYPES[key])
                     for key in TENSOR_NAMES}


def _warn_unsaved_trainables(state: AdapterState, what: str) -> None:
    """A LolduWarning when parameters outside the adapter (its z, sigma and saved modules) require grad:
    they may have been trained, and the adapter file does not hold them."""
    ours = {id(p) for _, layer in state.layers for p in list(layer.loldu_z.values()) + list(layer.loldu_sigma.values())}
    ours |= {id(p) for _, m in state.saved for p in m.modules_to_save.parameters()}
    others = [n for n, p in state.root.named_parameters() if p.requires_grad and id(p) not in ours]
    if others:
        warnings.warn(f"{what}: {len(others)} parameter(s) outside the adapter require grad ({others[0]!r}, ...): if "
                      "they were trained, the adapter file does not hold them; put their module in modules_to_save "
                      "to train and save it with the adapter", LolduWarning, stacklevel=3)


def _remove_legacy_copy(d: Path) -> None:
    """Removes an adapter_config.json that an older loldu wrote here (format 1 or 2): the directory now
    holds a format-3 adapter, whose copy is loldu_config.json. Best effort; another tool's file stays."""
    path = d / LEGACY_CONFIG_NAME
    try:
        if not path.is_symlink() and json.loads(read_regular(path, 64 << 20)).get("format") == FORMAT:
            path.unlink()
    except (OSError, ValueError, AttributeError, RecursionError):
        pass


def _parse_header(text, path: Path) -> dict:
    try:
        header = json.loads(text)
    except ValueError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{path}: not a loldu adapter config (JSON nested too deeply)") from None
    _require_unicode(header, path, "the adapter config")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise AdapterError(f"{path}: not a loldu adapter config (format {fmt!r})")
    return header


def _stored_version(meta: dict, wpath: Path) -> int:
    fmt = meta.get(META_FORMAT)
    if fmt is None and META_V1_CONFIG_SHA256 in meta:
        return 1
    m = re.fullmatch(re.escape(FORMAT) + f"/([0-9]{{1,{VERSION_MAX_DIGITS}}})", fmt) if isinstance(fmt, str) else None
    if m:
        version = int(m.group(1))
        if version in READABLE_VERSIONS:
            return version
        raise AdapterError(f"{wpath}: format_version {version} is not supported (this loldu reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))})")
    raise AdapterError(f"{wpath}: not a loldu adapter file ({META_FORMAT} {fmt!r})")


class AdapterFile(tuple):
    """An adapter as read_adapter read and checked it: the tuple (header, config, tensors), plus
    `source`, the file its config was read from (named in messages). load_adapter takes it in place
    of a directory, so a caller that looks at the header first reads and hashes the file once.

    tensors["z"] and tensors["pivots"] are the layers' vectors concatenated (R,), whatever the
    format; each header layer entry has its "rank". layer(i) gives layer i's own tensors."""

    def __new__(cls, header: dict, config: LoLDUConfig, tensors: Dict[str, torch.Tensor], source) -> "AdapterFile":
        self = super().__new__(cls, (header, config, tensors))
        self.source = Path(source)
        self.offsets = [0]
        for e in header["layers"]:
            self.offsets.append(self.offsets[-1] + e["rank"])
        return self

    def __getnewargs__(self):
        return (*self, self.source)

    header = property(lambda self: self[0])
    config = property(lambda self: self[1])
    tensors = property(lambda self: self[2])

    @property
    def ranks(self) -> List[int]:
        """Each layer's rank, in file order."""
        return [e["rank"] for e in self.header["layers"]]

    def layer(self, i: int) -> Dict[str, torch.Tensor]:
        """Layer i's z (r,), sigma (), pivots (r,) and fingerprint (32,): views of the file's tensors."""
        a, b = self.offsets[i], self.offsets[i + 1]
        t = self.tensors
        return {"z": t["z"][a:b], "sigma": t["sigma"][i], "pivots": t["pivots"][a:b], "fingerprint": t["fingerprint"][i]}


def _stored_header(entries: dict, d: Path, wpath: Path) -> Tuple[dict, int, Path]:
    """(header, format version, the file the header was read from) of the weights file whose parsed
    safetensors header is `entries`, its hash checked."""
    meta = _metadata_of(entries, wpath)
    version = _stored_version(meta, wpath)
    cpath = d / (CONFIG_NAME if version >= 3 else LEGACY_CONFIG_NAME)
    if version < 2:
        config_bytes = _read_config(cpath)
        header = _parse_header(config_bytes, cpath)
        if meta.get(META_V1_CONFIG_SHA256) != hashlib.sha256(config_bytes).hexdigest():
            raise AdapterError(f"{wpath}: does not belong to {cpath} (config hash mismatch): the pair is corrupted or mixed up")
        return header, version, cpath
    # The weights file is the whole adapter; the readable copy beside it is checked but not needed.
    text = meta.get(META_CONFIG)
    stored = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else None
    if stored is None or meta.get(META_CONFIG_SHA256) != hashlib.sha256(stored).hexdigest():
        raise AdapterError(f"{wpath}: the config stored in the file does not match its hash: the file is corrupted")
    header = _parse_header(text, wpath)
    if not _copy_matches(cpath, stored):
        warnings.warn(f"{cpath}: missing or differs from the config stored in {wpath} (an interrupted save, "
                      "or an edit); using the stored one. The next save_adapter rewrites it.",
                      AdapterWarning, stacklevel=4)
    return header, version, wpath


def _checked_header(header: dict, version: int, source: Path) -> Tuple[LoLDUConfig, List[dict], List[dict]]:
    """(config, layers, saved_modules) of a header, each checked for its shape."""
    if header.get("format_version") != version:
        raise AdapterError(f"{source}: format_version {header.get('format_version')!r} is not supported here "
                           f"(the weights file says {version})")
    try:
        config = LoLDUConfig.from_dict(header.get("config"))
    except (TypeError, ValueError, ArithmeticError, RecursionError) as e:  # AdapterError is a ValueError
        raise AdapterError(f"{source}: invalid config: {e}") from None
    _check_adapter_name(header.get("adapter_name"), source)
    layers = header.get("layers")
    check_layers(layers, source)
    check_ranks(layers, config, version, source)
    saved = header.get("saved_modules", []) if version >= 3 else []
    ok = isinstance(saved, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] and isinstance(e.get("tensors"), list)
        and all(isinstance(t, str) and t for t in e["tensors"]) for e in saved)
    if not ok or len({e["name"] for e in saved}) != len(saved):
        raise AdapterError(f"{source}: 'saved_modules' must be a list of {{name, tensors}} with distinct names")
    return config, layers, saved


def _check_adapter_name(name, source: Path) -> None:
    """The stored adapter name: absent (None or "", loaded as "default") or matching the spec's pattern."""
    if name is None or name == "":
        return
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise AdapterError(f"{source}: adapter_name {name!r} must be a str matching {ADAPTER_NAME_PATTERN} (letters, "
                           "digits, _ or -, not starting with a digit or -)")


def _read(d: Path) -> AdapterFile:
    """read_adapter: the weights file read once, every hash checked once."""
    wpath = d / WEIGHTS_NAME
    # Everything the header says is checked before the tensor data is read (a sparse file whose
    # size matches a wrong tensor table would otherwise be read whole first).
    head, entries = _read_head(wpath)
    header, version, source = _stored_header(entries, d, wpath)
    config, layers, saved = _checked_header(header, version, source)
    saved_keys = {f"{SAVED_PREFIX}{e['name']}.{t}" for e in saved for t in e["tensors"]}
    check_table(entries, saved_keys, [e["rank"] for e in layers], version, wpath)
    raw = _read_bytes(wpath)
    if raw[: len(head)] != head:
        raise AdapterError(f"{wpath}: the file changed while it was read (its header differs)")
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{wpath}: corrupted safetensors file ({e})") from None
    if header.get("data_sha256") != _data_hash(tensors):
        raise AdapterError(f"{wpath}: tensor data does not match the hash in {source}: the file is corrupted")
    for key in ("z", "pivots"):  # formats before RAGGED_FROM: (L, r), the same order
        tensors[key] = tensors[key].reshape(-1)
    tensors["pivots"] = tensors["pivots"].long()  # loldu.ldu's index dtype
    check_values(tensors, saved_keys, layers, config, wpath)
    return AdapterFile(header, config, tensors, source)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector: a read allocates a dict or tensor per layer and saved
    tensor, none in a cycle, and the collector's passes over them made large reads superlinear."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_adapter(directory) -> AdapterFile:
    """Reads and fully checks an adapter directory: (header, config, tensors), an AdapterFile that
    load_adapter also takes. Touches no model.

    Formats 2 and 3 need only adapter_model.safetensors (a readable copy that differs from the
    stored config is ignored with an AdapterWarning); format 1 needs both files. Raises
    AdapterError naming the file on a missing, unreadable, corrupted or mismatched file.
    """
    with _collector_paused():
        return _read(_as_path(directory, "loldu.read_adapter"))


def _check_layer(entry: dict, module_name: str, kind: str, W: torch.Tensor, pivots: torch.Tensor, fp: torch.Tensor,
                 where: str, layer=None) -> None:
    """The file's layer entry against the model's module of weight matrix W; `layer`: the LoLDU layer
    around it when the model is injected, whose store says W0's dtype and fingerprint (an "lu" store
    keeps the LU in W0's place)."""
    dtype = W.dtype if layer is None else layer.store.base_dtype(layer)
    if entry["kind"] != kind:
        raise AdapterError(f"{where}: layer '{module_name}' is a {kind} layer in the model but {entry['kind']} in the file")
    if list(W.shape) != entry["shape"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight {tuple(W.shape)} in the model but "
                           f"{tuple(entry['shape'])} in the file")
    if str(dtype).replace("torch.", "") != entry["dtype"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight dtype {dtype} in the model but "
                           f"{entry['dtype']} in the file")
    from .distributed import fingerprint_any  # W[:, :r] and the pivot rows, also of a sharded W (lazy: torch.distributed)

    now = fingerprint_any(W, pivots) if layer is None or not torch.equal(pivots, layer.loldu_pivots.cpu()) else (
        layer.base_fingerprint())
    if now != bytes(fp.tolist()):
        raise AdapterError(f"{where}: layer '{module_name}': the base weight's fingerprint differs from the one the "
                           "adapter was trained on (a different base model or checkpoint)")


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike, AdapterFile], adapter_name: Optional[str] = None,
                 *, is_trainable: bool = False, progress: Optional[bool] = None, check_calls: bool = True) -> nn.Module:
    """Loads an adapter saved by save_adapter into `model` and returns it (edited in place).

    `directory`: the adapter directory, or what read_adapter returned for it (the file is then not
    read again). A plain base model is injected from the stored config, and the loaded adapter is
    active. On an already injected model the adapter is added under `adapter_name` (default: its
    stored name), not activated (loldu.set_adapter). Frozen factors come from the base weights and
    the stored pivots; saved modules (task heads) get the stored tensors.
    is_trainable: as PEFT's: False (default) loads the adapter for inference, its z, sigma and saved
    modules frozen; True makes them require grad (to go on training it). An adapter added to an
    already injected model is not active and trains once loldu.set_adapter makes it active.
    Everything is checked first; on any AdapterError (naming the file and layer) the model is unchanged.
    check_calls: as for loldu.inject (the run-time check that every layer is called by its parent;
    only armed when the model is injected here).
    """
    if not isinstance(is_trainable, bool):
        raise AdapterError(f"loldu.load_adapter: is_trainable must be a bool, got {is_trainable!r}")
    if not isinstance(directory, AdapterFile):
        with _collector_paused():
            directory = _read(_as_path(directory, "loldu.load_adapter"))
    header, config, tensors = directory
    where = str(directory.source)
    name = adapter_name or header.get("adapter_name") or "default"
    entries = {e["name"]: (i, e) for i, e in enumerate(header["layers"])}
    per_layer = {n: directory.layer(i) for n, (i, _) in entries.items()}
    pivots = {n: t["pivots"] for n, t in per_layer.items()}
    values = {n: (t["z"], t["sigma"]) for n, t in per_layer.items()}
    saved_values = {e["name"]: {t: tensors[f"{SAVED_PREFIX}{e['name']}.{t}"] for t in e["tensors"]}
                    for e in header.get("saved_modules", [])}

    def check(targets) -> None:
        """The (name, module, kind) the adapter goes onto must be the file's layers, on its base weights."""
        _same_names(entries, {n for n, _, _ in targets}, where, lambda missing: (
            f"layer '{missing[0]}' is in the adapter but the model has no such targeted layer "
            f"({len(missing)} missing){_class_hint(missing, model, header)}"), lambda extra: (
            f"layer '{extra[0]}' is targeted in the model but absent from the adapter ({len(extra)} extra)"))
        injected = {id(layer.base_layer): layer for _, layer in AdapterState.of(model).layers}
        for n, module, kind in targets:
            i, e = entries[n]
            _check_layer(e, n, kind, weight_matrix(module), pivots[n], per_layer[n]["fingerprint"], where,
                         injected.get(id(module)))

    def check_saved(found) -> None:
        """The modules trained beside the adapter must be the file's saved modules."""
        _same_names(saved_values, {n for n, _ in found}, where, lambda missing: (
            f"saved module '{missing[0]}' (modules_to_save) is in the adapter but the model has no such "
            f"module{_head_hint(model, missing[0])}"), lambda extra: (
            f"module '{extra[0]}' is selected by the adapter's modules_to_save in the model but absent from the file"))

    state = AdapterState.of(model)
    if not state.layers:
        inject_with(model, config, name, pivots=pivots, values=values, check=check, progress=progress,
                    where=where, check_calls=check_calls, saved_values=saved_values, check_saved=check_saved,
                    trainable=is_trainable)
        return model
    if name in state.names:
        raise AdapterError(f"{where}: the model already has an adapter {name!r}; pass another adapter_name")
    state.require_unmerged(where, fix="call loldu.unmerge before loading another adapter")
    return add_with(model, name, config, pivots=pivots, values=values, check=check, what="loldu.load_adapter",
                    where=where, saved_values=saved_values, check_saved=check_saved)


def _head_hint(model: nn.Module, name: str) -> str:
    """A hint when the model seems to be the bare encoder of a task model (no head to load into)."""
    leaf = name.rpartition(".")[2]
    if leaf in {n for heads in TASK_HEADS.values() for n in heads}:
        return (f" (a task head: load the model class the adapter was trained with, e.g. "
                f"AutoModelForSequenceClassification, not the bare {type(model).__name__})")
    return ""


def _same_names(in_file, in_model: set, where: str, missing: Callable[[List[str]], str],
                extra: Callable[[List[str]], str]) -> None:
    """The names the adapter file holds (in its order) must be those the model has: AdapterError with
    `missing(names)` for the first ones the model lacks, else `extra(names)` for those the file lacks."""
    lacking = [n for n in in_file if n not in in_model]
    if lacking:
        raise AdapterError(f"{where}: {missing(lacking)}")
    surplus = sorted(in_model - set(in_file))
    if surplus:
        raise AdapterError(f"{where}: {extra(surplus)}")


def _class_hint(missing: List[str], model: nn.Module, header: dict) -> str:
    """When the adapter's layer names are the model's under a prefix (or without one), the adapter was
    trained on another model class of the same base (a task model vs its bare encoder): say which."""
    names = {n for n, _ in unwrap(model).named_modules() if n}
    saved_class = header.get("model_class")
    trained_on = f" ({saved_class})" if isinstance(saved_class, str) else ""
    head, _, rest = missing[0].partition(".")
    if rest and rest in names:
        return (f"; the adapter's layers are the model's under the prefix '{head}.': it was trained on a task model "
                f"of this base{trained_on}, load it into that class (e.g. AutoModelForSequenceClassification), not "
                f"the bare {type(model).__name__}")
    for n in names:
        if n.endswith("." + missing[0]):
            return (f"; the model has it as '{n}': the adapter was trained on the bare model{trained_on}, not on "
                    f"{type(model).__name__}")
    return ""
