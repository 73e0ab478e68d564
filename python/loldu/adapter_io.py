"""Saving and loading one adapter: `adapter_model.safetensors` (+ `adapter_config.json`), no pickle.

An adapter file holds, per layer, z (r,), sigma, the r pivot indices and a fingerprint of the base
weight; nothing of size d or k (docs/method.md §2). The frozen factors are re-derived on load from
the base weights and the stored pivots, after checking the fingerprint.

Format 2: adapter_model.safetensors alone is the whole adapter. Its tensors, one row per layer in
the order of the config's `layers`:
    z (L, r) fp32 | sigma (L,) fp32 | pivots (L, r) int32 | fingerprint (L, 32) uint8 (sha256)
Its metadata: `loldu_format` ("loldu-adapter/2"), `loldu_config` (the config JSON text: adapter
name, LoLDUConfig, per layer name/kind/shape/dtype, and the sha256 of the tensor data) and
`loldu_config_sha256` (the sha256 of that text), so a flipped bit in the config or the tensors is refused.
loldu_config.json is a byte-identical copy of `loldu_config`, for people and tools; the loader
does not need it, and ignores it with one AdapterWarning when it differs (left stale by an
interrupted save, or edited by hand). The fingerprint hashes the weight's (d, k) shape, dtype,
W[:, :r] and W[pivots, :]: exactly what the factorization reads.
Format 3 adds the modules trained fully beside the adapter (modules_to_save, task heads): each
tensor t of saved module m is stored as `saved.<m>.<t>` in its own dtype, the config lists them as
`saved_modules` [{name, tensors}], and the readable copy is named loldu_config.json (PEFT's tools
look for adapter_config.json, and find none: this is not a PEFT adapter; a stale loldu
adapter_config.json of an older format is removed by the next save).
Formats 2 (the same without saved modules, its copy named adapter_config.json) and 1 (the config
read from adapter_config.json, whose sha256 the weights' metadata records) are still read.

Crash safety: save_adapter writes each file to a fsynced temporary file in the directory, renames the
weights file over the old one (the single atomic commit), then the config copy, then fsyncs the
directory. Killed at any moment, the directory loads as exactly the old or exactly the new adapter.
A target that cannot be replaced (a directory in its place) is refused before anything is written;
a config copy that still cannot be renamed after the commit leaves the save successful, with an
AdapterWarning (the copy is stale, which load_adapter tolerates).
Temporary files are named `.<target name>.<writer pid>-<8 random chars>.tmp`, and their writer holds
an exclusive flock on each while it lives (the kernel drops it when the process dies, SIGKILL
included). Every save or export first removes the temporaries of its target names that no process
holds locked (clean_stale_temps): a live writer's temporary is never removed, so concurrent writers
do not break each other; the last rename wins.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import TASK_HEADS, LoLDUConfig
from .errors import AdapterError, LolduWarning
from .layer import weight_matrix
from .model import add_with, inject_with
from .state import AdapterState, unwrap

CONFIG_NAME = "loldu_config.json"
LEGACY_CONFIG_NAME = "adapter_config.json"  # formats 1 and 2 (PEFT's file name)
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loldu-adapter"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SAVED_PREFIX = "saved."  # tensor t of saved module m is stored as "saved.<m>.<t>"
# Pivots are row indices of a (d, k) weight: int32 on disk halves their share of the file.
_TENSORS = {"z": torch.float32, "sigma": torch.float32, "pivots": torch.int32, "fingerprint": torch.uint8}
# Unlocked temporaries of ours that are removed by the next write to the same target (see above).
STALE_EMPTY_SECONDS = 10.0
STALE_UNLOCKED_SECONDS = 3600.0
_TEMP_SUFFIX = ".tmp"


class AdapterWarning(LolduWarning):
    """load_adapter ignored an adapter_config.json that differs from the config in the weights file,
    or save_adapter committed the adapter but could not replace adapter_config.json (its readable copy)."""


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


def _file_mode() -> int:
    """The mode open() would give a new file: 0o666 minus the process umask (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# -- temporary files -----------------------------------------------------------------------------
def _temp_patterns(target: Path) -> Tuple["re.Pattern", "re.Pattern"]:
    """Our temporaries' names: `.<name>.<pid>-<8 chars>.tmp` (tempfile.mkstemp's 8 characters of
    [a-z0-9_]), and `.<name>.<8 chars>.tmp` as loldu wrote them before it locked its temporaries."""
    head, tail = re.escape(f".{target.name}."), r"[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX)
    return re.compile(head + r"([0-9]+)-" + tail), re.compile(head + tail)


def _try_lock(fd: int) -> Optional[bool]:
    """Exclusive non-blocking flock: True if taken, False if another open file holds it, None if
    this file system cannot lock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or not a pid we can ask about
        return True
    return True


def clean_stale_temps(target) -> List[str]:
    """Removes the temporary files of `target` that killed writers left behind; returns their paths.

    Only names of our pattern are considered, and a file is removed only when no process holds its
    flock (its writer is gone: the kernel drops the lock of a dead process) and it is non-empty
    (written after locking), or empty with its writer's pid (in the name) gone or older than
    STALE_EMPTY_SECONDS (a live writer may be between creating and locking it). Without flock, and
    for the unlocked temporaries of older loldu versions: older than STALE_UNLOCKED_SECONDS.
    Best effort: a file that cannot be examined is left.
    """
    target = Path(target)
    ours, legacy = _temp_patterns(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    removed = []
    for n in names:
        m = ours.fullmatch(n)
        if m is None and not legacy.fullmatch(n):
            continue
        p = target.parent / n
        try:  # no symlink followed, no FIFO waited on
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            age = time.time() - st.st_mtime
            locked = _try_lock(fd) if m else None
            if locked is False:
                continue  # a live writer's file
            if locked is None:
                stale = age > STALE_UNLOCKED_SECONDS
            else:
                stale = st.st_size > 0 or age > STALE_EMPTY_SECONDS or not _pid_alive(int(m.group(1)))
            if not stale:
                continue
            now = os.stat(p, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still the file examined
                os.unlink(p)
                removed.append(str(p))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _locked_temp(target: Path, mode: int) -> Tuple[int, str]:
    """A new temporary file next to `target`, with `mode`, exclusively flocked: (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=_TEMP_SUFFIX)
    try:
        if fcntl is not None:
            try:  # blocking: a cleaner examining the new (empty) file holds it for a moment only
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: cleaners fall back to the file's age
                pass
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _fsync_dir(directory: Path) -> None:
    """Makes completed renames durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(paths: Sequence) -> Iterator[List[str]]:
    """Temporary files next to each of `paths`, for the body to write (by name).

    Stale temporaries of the same targets are removed first (clean_stale_temps). The new ones are
    created with the mode a plain open() would give them (0o666 & ~umask) and stay flocked while
    they live. When the body returns, they are renamed over `paths` in order; when it raises, they
    are removed and the targets are untouched. Raises OSError (callers name their own error type).
    """
    paths = [Path(p) for p in paths]
    made: List[Tuple[int, str]] = []
    try:
        for p in paths:
            _require_replaceable(p)
        mode = _file_mode()
        for p in paths:
            clean_stale_temps(p)
        for p in paths:
            made.append(_locked_temp(p, mode))
        yield [tmp for _, tmp in made]
        for (_, tmp), p in zip(made, paths):
            os.replace(tmp, p)
        for d in {p.parent for p in paths}:
            _fsync_dir(d)
    finally:
        for fd, tmp in made:  # unlink before closing: the file stays locked until it is gone
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.close(fd)


def _require_replaceable(target: Path) -> None:
    """Raises IsADirectoryError when `target` is a directory: no file can be renamed over it."""
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way of the file", str(target))


def write_atomic(files: Dict) -> List[Tuple[Path, OSError]]:
    """Writes {path: bytes}: each file to a fsynced, flocked temporary file in turn, then renames
    them into place in the given order (so the first is the commit point), then fsyncs the directory.

    Every target is checked first (a directory in the way raises before anything is written). On any
    failure before the commit nothing is renamed, the temporaries are removed, and OSError is raised.
    A rename after the commit that still fails does not raise: it is returned as (path, OSError),
    and that file is left as it was.
    """
    items = [(Path(p), data) for p, data in files.items()]
    made: List[Tuple[int, str]] = []
    late: List[Tuple[Path, OSError]] = []
    try:
        for p, _ in items:
            _require_replaceable(p)
        mode = _file_mode()
        for p, _ in items:
            clean_stale_temps(p)
        for p, data in items:  # one at a time: a kill leaves at most one unwritten temporary
            fd, tmp = _locked_temp(p, mode)
            made.append((fd, tmp))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        for i, ((_, tmp), (p, _)) in enumerate(zip(made, items)):
            try:
                os.replace(tmp, p)
            except OSError as e:
                if i == 0:
                    raise
                late.append((p, e))
        for d in {p.parent for p, _ in items}:
            _fsync_dir(d)
    finally:
        for fd, tmp in made:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.close(fd)
    return late


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> Dict[str, int]:
    """Writes adapter `adapter_name` (default: the active one) of `model` into `directory`.

    adapter_model.safetensors holds the whole adapter (config included) and is committed by one
    atomic rename; adapter_config.json, a copy of its config, follows. Killed at any moment, the
    directory loads as the old adapter or the new one (see the module docstring).
    Returns {file name: size in bytes} of the files written. Raises AdapterError if the model is
    merged, if a layer's z or sigma holds NaN/Inf (naming the layer), and naming the directory when
    it cannot be created or written (a directory in the way of a file included); the adapter there
    before, if any, is then unchanged. If adapter_model.safetensors was committed but
    adapter_config.json (the readable copy) then cannot be replaced, the save succeeds with an
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
    entries, z, sigma, piv, fps = [], [], [], [], []
    for n, layer in state.layers:
        W = layer.base_matrix()
        entries.append({"name": n, "kind": layer.kind, "shape": list(W.shape), "dtype": str(W.dtype).replace("torch.", "")})
        z.append(layer.loldu_z[name].detach().float().cpu())
        sigma.append(layer.loldu_sigma[name].detach().float().cpu().reshape(()))
        if not (torch.isfinite(z[-1]).all() and torch.isfinite(sigma[-1])):
            raise AdapterError(f"{what}: layer '{n}': adapter {name!r} holds NaN/Inf in z or sigma (training diverged); "
                               "nothing was written (load_adapter would refuse such a file)")
        piv.append(layer.loldu_pivots.cpu())
        fps.append(torch.frombuffer(bytearray(fingerprint(W, layer.loldu_pivots)), dtype=torch.uint8))
    _warn_unsaved_trainables(state, what)
    tensors = {"z": torch.stack(z), "sigma": torch.stack(sigma), "pivots": torch.stack(piv).to(torch.int32),
               "fingerprint": torch.stack(fps)}
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
    weights_bytes = st_save(tensors, metadata={"format": "pt", "loldu_format": f"{FORMAT}/{FORMAT_VERSION}",
                                               "loldu_config": config_text,
                                               "loldu_config_sha256": hashlib.sha256(config_bytes).hexdigest()})
    if d.exists() and not d.is_dir():
        raise AdapterError(f"loldu.save_adapter: {str(d)!r} exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterError(f"loldu.save_adapter: cannot create the adapter directory {str(d)!r} "
                           f"({_os_reason(e)})") from None
    try:
        # The weights file is the commit: renamed first, it alone is a complete adapter.
        late = write_atomic({d / WEIGHTS_NAME: weights_bytes, d / CONFIG_NAME: config_bytes})
    except OSError as e:
        raise AdapterError(f"loldu.save_adapter: cannot write the adapter into {str(d)!r} ({_os_reason(e)}); "
                           "the adapter there before, if any, is unchanged") from None
    written = {WEIGHTS_NAME: len(weights_bytes), CONFIG_NAME: len(config_bytes)}
    _remove_legacy_copy(d)
    for path, e in late:
        written.pop(path.name)
        warnings.warn(f"loldu.save_adapter: the adapter was saved into {str(d)!r} ({WEIGHTS_NAME} holds all of it), "
                      f"but its readable copy {path.name} could not be replaced ({_os_reason(e)}); it is stale until "
                      "the next save", AdapterWarning, stacklevel=2)
    return written


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
        if path.is_file() and not path.is_symlink() and path.stat().st_size < (64 << 20):
            if json.loads(path.read_bytes()).get("format") == FORMAT:
                path.unlink()
    except (OSError, ValueError, AttributeError, RecursionError):
        pass


def _os_reason(e: OSError) -> str:
    """'PermissionError: [Errno 13] Permission denied: '/x/y'' in one line."""
    return " ".join(f"{type(e).__name__}: {e}".split())


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
    except RecursionError:
        raise AdapterError(f"{path}: corrupted safetensors header (JSON nested too deeply)") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: corrupted safetensors metadata")
    return meta


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read the adapter file ({_os_reason(e)})") from None


def _parse_header(text, path: Path) -> dict:
    try:
        header = json.loads(text)
    except ValueError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{path}: not a loldu adapter config (JSON nested too deeply)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise AdapterError(f"{path}: not a loldu adapter config (format {fmt!r})")
    return header


def _stored_version(meta: dict, wpath: Path) -> int:
    fmt = meta.get("loldu_format")
    if fmt is None and "config_sha256" in meta:
        return 1
    m = re.fullmatch(re.escape(FORMAT) + "/([0-9]{1,6})", fmt) if isinstance(fmt, str) else None
    if m:
        version = int(m.group(1))
        if version in READABLE_VERSIONS:
            return version
        raise AdapterError(f"{wpath}: format_version {version} is not supported (this loldu reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))})")
    raise AdapterError(f"{wpath}: not a loldu adapter file (loldu_format {fmt!r})")


def _read(directory) -> Tuple[dict, LoLDUConfig, Dict[str, torch.Tensor], Path]:
    """read_adapter, plus the file the config was read from."""
    d = Path(directory)
    wpath = d / WEIGHTS_NAME
    raw = _read_bytes(wpath)
    meta = _st_metadata(raw, wpath)
    version = _stored_version(meta, wpath)
    cpath = d / (CONFIG_NAME if version >= 3 else LEGACY_CONFIG_NAME)
    if version >= 2:
        # The weights file is the whole adapter; adapter_config.json is a copy, checked but not needed.
        text = meta.get("loldu_config")
        stored = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else None
        if stored is None or meta.get("loldu_config_sha256") != hashlib.sha256(stored).hexdigest():
            raise AdapterError(f"{wpath}: the config stored in the file does not match its hash: the file is corrupted")
        header, source = _parse_header(text, wpath), wpath
        try:
            copy_ok = cpath.read_bytes() == stored
        except OSError:
            copy_ok = False
        if not copy_ok:
            warnings.warn(f"{cpath}: missing or differs from the config stored in {wpath} (an interrupted save, "
                          "or an edit); using the stored one. The next save_adapter rewrites it.",
                          AdapterWarning, stacklevel=3)
    else:
        config_bytes = _read_bytes(cpath)
        header, source = _parse_header(config_bytes, cpath), cpath
        if meta.get("config_sha256") != hashlib.sha256(config_bytes).hexdigest():
            raise AdapterError(f"{wpath}: does not belong to {cpath} (config hash mismatch): the pair is corrupted or mixed up")
    if header.get("format_version") != version:
        raise AdapterError(f"{source}: format_version {header.get('format_version')!r} is not supported here "
                           f"(the weights file says {version})")
    try:
        config = LoLDUConfig.from_dict(header.get("config"))
    except (TypeError, ValueError, ArithmeticError, RecursionError) as e:  # AdapterError is a ValueError
        raise AdapterError(f"{source}: invalid config: {e}") from None
    layers = header.get("layers")
    ok = isinstance(layers, list) and layers and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("kind"), str)
        and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list) and len(e["shape"]) == 2
        and all(isinstance(s, int) and s > 0 for s in e["shape"]) for e in layers)
    if not ok:
        raise AdapterError(f"{source}: 'layers' must be a non-empty list of {{name, kind, shape [d, k], dtype}}")
    names = [e["name"] for e in layers]
    if len(set(names)) != len(names):
        raise AdapterError(f"{source}: repeated layer names")
    saved = header.get("saved_modules", []) if version >= 3 else []
    ok = isinstance(saved, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] and isinstance(e.get("tensors"), list)
        and all(isinstance(t, str) and t for t in e["tensors"]) for e in saved)
    if not ok or len({e["name"] for e in saved}) != len(saved):
        raise AdapterError(f"{source}: 'saved_modules' must be a list of {{name, tensors}} with distinct names")
    saved_keys = {f"{SAVED_PREFIX}{e['name']}.{t}" for e in saved for t in e["tensors"]}
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{wpath}: corrupted safetensors file ({e})") from None
    if set(tensors) != set(_TENSORS) | saved_keys:
        raise AdapterError(f"{wpath}: expected tensors {sorted(set(_TENSORS) | saved_keys)}, found {sorted(tensors)}")
    L, r = len(layers), config.rank
    shapes = {"z": (L, r), "sigma": (L,), "pivots": (L, r), "fingerprint": (L, 32)}
    for key, dt in _TENSORS.items():  # before hashing: shapes and dtypes of the adapter's own tensors
        t = tensors[key]
        if t.dtype != dt or tuple(t.shape) != shapes[key]:
            raise AdapterError(f"{wpath}: tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dt} {shapes[key]} "
                               f"({L} layers, rank {r})")
    if header.get("data_sha256") != _data_hash(tensors):
        raise AdapterError(f"{wpath}: tensor data does not match the hash in {source}: the file is corrupted")
    tensors["pivots"] = tensors["pivots"].long()  # loldu.ldu's index dtype
    if not (torch.isfinite(tensors["z"]).all() and torch.isfinite(tensors["sigma"]).all()):
        raise AdapterError(f"{wpath}: z or sigma holds NaN/Inf")
    for key in sorted(saved_keys):
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
            raise AdapterError(f"{wpath}: saved tensor '{key}' holds NaN/Inf")
    for i, e in enumerate(layers):
        p = tensors["pivots"][i]
        if int(p.min()) < 0 or int(p.max()) >= e["shape"][0] or p.unique().numel() != r:
            raise AdapterError(f"{wpath}: layer '{e['name']}': pivots must be {r} distinct rows in [0, {e['shape'][0]})")
    return header, config, tensors, source


def read_adapter(directory) -> Tuple[dict, LoLDUConfig, Dict[str, torch.Tensor]]:
    """Reads and fully checks an adapter directory: (header, config, tensors). Touches no model.

    Format 2 needs only adapter_model.safetensors (a differing adapter_config.json is ignored with
    an AdapterWarning); format 1 needs both files. Raises AdapterError naming the file on a missing,
    unreadable, corrupted or mismatched file.
    """
    header, config, tensors, _ = _read(_as_path(directory, "loldu.read_adapter"))
    return header, config, tensors


def _check_layer(entry: dict, module_name: str, module: nn.Module, kind: str, W: torch.Tensor,
                 pivots: torch.Tensor, fp: torch.Tensor, where: str) -> None:
    if entry["kind"] != kind:
        raise AdapterError(f"{where}: layer '{module_name}' is a {kind} layer in the model but {entry['kind']} in the file")
    if list(W.shape) != entry["shape"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight {tuple(W.shape)} in the model but "
                           f"{tuple(entry['shape'])} in the file")
    if str(W.dtype).replace("torch.", "") != entry["dtype"]:
        raise AdapterError(f"{where}: layer '{module_name}' has weight dtype {W.dtype} in the model but "
                           f"{entry['dtype']} in the file")
    if fingerprint(W, pivots) != bytes(fp.tolist()):
        raise AdapterError(f"{where}: layer '{module_name}': the base weight's fingerprint differs from the one the "
                           "adapter was trained on (a different base model or checkpoint)")


def load_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None, *,
                 is_trainable: bool = False, progress: Optional[bool] = None, check_calls: bool = True) -> nn.Module:
    """Loads an adapter saved by save_adapter into `model` and returns it (edited in place).

    A plain base model is injected from the stored config, and the loaded adapter is active. On an
    already injected model the adapter is added under `adapter_name` (default: its stored name), not
    activated (loldu.set_adapter). Frozen factors come from the base weights and the stored pivots;
    saved modules (task heads) get the stored tensors.
    is_trainable: as PEFT's: False (default) loads the adapter for inference, its z, sigma and saved
    modules frozen; True makes them require grad (to go on training it). An adapter added to an
    already injected model is not active and trains once loldu.set_adapter makes it active.
    Everything is checked first; on any AdapterError (naming the file and layer) the model is unchanged.
    check_calls: as for loldu.inject (the run-time check that every layer is called by its parent;
    only armed when the model is injected here).
    """
    if not isinstance(is_trainable, bool):
        raise AdapterError(f"loldu.load_adapter: is_trainable must be a bool, got {is_trainable!r}")
    header, config, tensors, source = _read(_as_path(directory, "loldu.load_adapter"))
    where = str(source)
    name = adapter_name or header.get("adapter_name") or "default"
    entries = {e["name"]: (i, e) for i, e in enumerate(header["layers"])}
    pivots = {n: tensors["pivots"][i] for n, (i, _) in entries.items()}
    values = {n: (tensors["z"][i], tensors["sigma"][i]) for n, (i, _) in entries.items()}
    saved_entries = header.get("saved_modules", [])
    saved_values = {e["name"]: {t: tensors[f"{SAVED_PREFIX}{e['name']}.{t}"] for t in e["tensors"]}
                    for e in saved_entries}

    def check(targets) -> None:
        """The (name, module, kind) the adapter goes onto must be the file's layers, on its base weights."""
        _missing_extra(entries, {n for n, _, _ in targets}, where, model, header)
        for n, module, kind in targets:
            i, e = entries[n]
            _check_layer(e, n, module, kind, weight_matrix(module), pivots[n], tensors["fingerprint"][i], where)

    def check_saved(found) -> None:
        """The modules trained beside the adapter must be the file's saved modules."""
        have = {n for n, _ in found}
        missing = [n for n in saved_values if n not in have]
        if missing:
            raise AdapterError(f"{where}: saved module '{missing[0]}' (modules_to_save) is in the adapter but the model "
                               f"has no such module{_head_hint(model, missing[0])}")
        extra = sorted(have - set(saved_values))
        if extra:
            raise AdapterError(f"{where}: module '{extra[0]}' is selected by the adapter's modules_to_save in the model "
                               "but absent from the file")

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


def _missing_extra(entries: dict, present: set, where: str, model: Optional[nn.Module] = None,
                   header: Optional[dict] = None) -> None:
    missing = [n for n in entries if n not in present]
    if missing:
        raise AdapterError(f"{where}: layer '{missing[0]}' is in the adapter but the model has no such targeted layer "
                           f"({len(missing)} missing){_class_hint(missing, model, header)}")
    extra = sorted(present - set(entries))
    if extra:
        raise AdapterError(f"{where}: layer '{extra[0]}' is targeted in the model but absent from the adapter "
                           f"({len(extra)} extra)")


def _class_hint(missing: List[str], model: Optional[nn.Module], header: Optional[dict]) -> str:
    """When the adapter's layer names are the model's under a prefix (or without one), the adapter was
    trained on another model class of the same base (a task model vs its bare encoder): say which."""
    if model is None:
        return ""
    names = {n for n, _ in unwrap(model).named_modules() if n}
    saved_class = (header or {}).get("model_class")
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
