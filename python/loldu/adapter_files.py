"""Reading an adapter's files without trusting them: only regular files are opened (a FIFO would
hang the reader, a device such as /dev/zero would read without end), and a file's size is checked
against what its own header claims before its data is read (a sparse file of gigabytes is refused
unread). Every failure is an AdapterError naming the file.
"""
import contextlib
import json
import struct
from pathlib import Path
from typing import Iterator, List, Tuple

from .atomic import NotRegularFile, open_regular
from .config import LoLDUConfig
from .errors import AdapterError
from .spec import (
    LAYER_DTYPES,
    LAYER_KINDS,
    RAGGED_FROM,
    SAME_DTYPE,
    TENSOR_ALLOWED_DTYPES,
    TENSOR_NAMES,
    TORCH_DTYPES,
    tensor_table,
)


def os_reason(e: OSError) -> str:
    """'PermissionError: [Errno 13] Permission denied: '/x/y'' in one line."""
    return " ".join(f"{type(e).__name__}: {e}".split())


# The most bytes a safetensors header may have (safetensors' own limit), and a config file (format 1).
_HEADER_MAX = 100_000_000
_CONFIG_MAX = 64 << 20


def _what_is_there(directory: Path) -> str:
    """A hint for a directory without an adapter file: a whole model (the plain transformers Trainer's
    or save_pretrained's output), Trainer checkpoints, or what it holds."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return ""
    if any(n in names for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        return ("; the directory holds a whole model (as transformers' plain Trainer or save_pretrained writes it), "
                "not a loldu adapter: adapters come from loldu.save_adapter, LoLDUModel.save_pretrained or "
                "loldu.trainer.LoLDUTrainer")
    checkpoints = [n for n in names if n.startswith("checkpoint-")]
    if checkpoints:
        return f"; the directory holds Trainer checkpoints: pass one of them, e.g. {directory / checkpoints[-1]}"
    return f"; the directory holds {names[:8]}" if names else "; the directory is empty"


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Tuple[object, int]]:
    """(file, size) of the adapter file `path`, a regular file (loldu.atomic.open_regular: a FIFO or
    a device there is refused without being read); AdapterError naming it otherwise."""
    try:
        with open_regular(path) as opened:
            yield opened
    except NotRegularFile as e:
        extra = "" if e.kind == "a directory" else ": loldu reads adapter files only from regular files"
        raise AdapterError(f"{path}: no such adapter file ({path.name} is {e.kind}){extra}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise AdapterError(f"{path}: no such adapter file{_what_is_there(path.parent)}") from None
    except MemoryError:
        raise AdapterError(f"{path}: the adapter file does not fit in memory") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read the adapter file ({os_reason(e)})") from None


def read_config_file(path: Path) -> bytes:
    """A format-1 config file, refused when larger than any config (_CONFIG_MAX) before it is read."""
    with _opened(path) as (f, size):
        if size > _CONFIG_MAX:
            raise AdapterError(f"{path}: {size} bytes, more than a config file may have ({_CONFIG_MAX})")
        return f.read(_CONFIG_MAX + 1)


def require_unicode(value, path: Path, what: str) -> None:
    """AdapterError naming `path` when a string in the parsed JSON `value` is not valid Unicode: Python's
    json takes a lone surrogate escape ("\\ud800") that no UTF-8 text, message or terminal can hold
    (and that the C++ reader's JSON parser refuses)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(f"{path}: {what} holds a string that is not valid Unicode (a lone surrogate such as "
                           "\\ud800)") from None


def _st_header(header: bytes, path: Path) -> dict:
    """A safetensors header (the JSON after the 8-byte length) as a dict."""
    try:
        entries = json.loads(header)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{path}: corrupted safetensors header ({e})") from None
    except RecursionError:
        raise AdapterError(f"{path}: corrupted safetensors header (JSON nested too deeply)") from None
    if not isinstance(entries, dict):
        raise AdapterError(f"{path}: corrupted safetensors header (not a JSON object)")
    require_unicode(entries, path, "the safetensors header")
    return entries


def metadata_of(entries: dict, path: Path) -> dict:
    """The `__metadata__` of a parsed safetensors header (read from `path`)."""
    meta = entries.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: corrupted safetensors metadata")
    return meta


def _data_length(entries: dict, path: Path) -> int:
    """The bytes of tensor data a parsed safetensors header describes (its largest data_offsets end)."""
    ends = [0]
    for key, e in entries.items():
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        if key != "__metadata__":
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
                raise AdapterError(f"{path}: corrupted safetensors header (tensor {key!r} has no valid data_offsets)")
            ends.append(offsets[1])
    return max(ends)


def read_weights_head(path: Path) -> Tuple[bytes, dict]:
    """(the first 8 + header length bytes, the parsed header) of the adapter (safetensors) file, its
    size checked as read_weights checks it: what a reader checks before it reads any tensor data."""
    with _opened(path) as (f, size):
        return _checked_head(f, size, path)


def _checked_head(f, size: int, path: Path) -> Tuple[bytes, dict]:
    """(8 + header bytes, the parsed header) of the open file `f` of `size` bytes, once its size is
    what its header claims (8 + header length + data length); `f` is left after them."""
    head = f.read(8)
    if len(head) < 8:
        raise AdapterError(f"{path}: truncated safetensors file ({len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise AdapterError(f"{path}: safetensors header length {n} exceeds the file size {size}")
    if n > _HEADER_MAX:
        raise AdapterError(f"{path}: safetensors header length {n} exceeds the limit of {_HEADER_MAX} bytes")
    header = f.read(n)
    entries = _st_header(header, path)
    claimed = 8 + n + _data_length(entries, path)
    if claimed != size:
        raise AdapterError(f"{path}: the file has {size} bytes but its safetensors header describes {claimed} "
                           "(8 + header + tensor data): it is truncated, padded or corrupted")
    return head + header, entries


def read_weights(path: Path) -> bytes:
    """The whole adapter (safetensors) file. Its size is checked against what its own header claims
    (8 + header length + data length) before the data is read, so a file that is truncated, padded
    or far larger than its tensors (a sparse file of gigabytes) is refused without reading it."""
    with _opened(path) as (f, size):
        _checked_head(f, size, path)
        f.seek(0)
        raw = f.read(size + 1)
    if len(raw) != size:
        raise AdapterError(f"{path}: the file changed while it was read ({size} bytes, then {len(raw)})")
    return raw


def same_copy(path: Path, stored: bytes) -> bool:
    """Whether the readable copy `path` holds exactly `stored`; read only when its size matches."""
    try:
        with open_regular(path) as (f, size):
            return size == len(stored) and f.read(size + 1) == stored
    except OSError:
        return False


# -- the header's layer and tensor tables (checked before any tensor data is read) -------------------
def check_layers(layers, source: Path) -> None:
    """`layers`: a non-empty list of {name, kind, shape [d, k], dtype} with distinct names, each kind
    and dtype one the spec allows and d, k positive ints (not bools) below 2**63."""
    ok = isinstance(layers, list) and layers and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("kind"), str)
        and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list) and len(e["shape"]) == 2
        and all(type(s) is int and 0 < s < 2 ** 63 for s in e["shape"]) for e in layers)
    if not ok:
        raise AdapterError(f"{source}: 'layers' must be a non-empty list of {{name, kind, shape [d, k], dtype}} "
                           "(d and k positive ints)")
    for e in layers:
        if e["kind"] not in LAYER_KINDS:
            raise AdapterError(f"{source}: layer {e['name']!r}: kind {e['kind']!r} is not one of "
                               f"{', '.join(LAYER_KINDS)}")
        if e["dtype"] not in LAYER_DTYPES:
            raise AdapterError(f"{source}: layer {e['name']!r}: dtype {e['dtype']!r} is not one of "
                               f"{', '.join(LAYER_DTYPES)} (the base weight dtypes LoLDU adapts)")
    if len({e["name"] for e in layers}) != len(layers):
        raise AdapterError(f"{source}: repeated layer names")


def check_ranks(layers: List[dict], config: LoLDUConfig, version: int, source: Path) -> None:
    """Each layer's rank: from RAGGED_FROM its entry's "rank", which must be what the config gives the
    layer (rank, rank_pattern; LoLDUConfig.rank_for); before, the config's one int rank, set into
    each entry here (in memory) so that every reader after this sees the same layout."""
    if version < RAGGED_FROM:
        if config.rank_pattern or not isinstance(config.rank, int):
            raise AdapterError(f"{source}: format_version {version} holds one int rank for all layers, but the config "
                               f"has rank={config.rank!r} or a rank_pattern (per-layer ranks need format "
                               f"{RAGGED_FROM})")
        for e in layers:
            e["rank"] = config.rank
        return
    for e in layers:
        r = e.get("rank")
        if type(r) is not int or r < 1:
            raise AdapterError(f"{source}: layer {e['name']!r}: rank must be a positive int, got {r!r}")
        try:
            want = config.rank_for(e["name"], tuple(e["shape"]), e["kind"])
        except AdapterError as err:
            raise AdapterError(f"{source}: {err}") from None
        if r != want:
            raise AdapterError(f"{source}: layer {e['name']!r}: rank {r} in the file, but its config gives the layer "
                               f"rank {want}")


def check_table(entries: dict, saved_keys: set, ranks: List[int], version: int, wpath: Path) -> None:
    """The tensor table (spec.tensor_table) as the safetensors header `entries` declares it, checked
    before any tensor data is read: exactly the adapter's tensors and the saved modules' ones; the
    adapter's own with their dtypes and shapes for the layers' ranks."""
    found = [key for key in entries if key != "__metadata__"]
    expected = set(TENSOR_NAMES) | saved_keys
    if set(found) != expected:
        raise AdapterError(f"{wpath}: expected tensors {sorted(expected)}, found {sorted(found)}")
    dtypes = {}
    L, r = len(ranks), (ranks[0] if version < RAGGED_FROM else sum(ranks))
    for key, (_, shape) in tensor_table(ranks, version).items():
        e = entries[key] if isinstance(entries[key], dict) else {}
        name, dims = e.get("dtype"), e.get("shape")
        dtypes[key] = TORCH_DTYPES.get(name, name) if isinstance(name, str) else name
        allowed = TENSOR_ALLOWED_DTYPES[key]
        ok_shape = isinstance(dims, list) and all(type(s) is int for s in dims) and tuple(dims) == shape
        if dtypes[key] not in allowed or not ok_shape:
            want = " or ".join(map(str, allowed))
            got = tuple(dims) if isinstance(dims, list) else dims
            ranks_are = f"rank {r}" if version < RAGGED_FROM else f"ranks summing to {r}"
            raise AdapterError(f"{wpath}: tensor '{key}' is {dtypes[key]} {got}, expected {want} {shape} "
                               f"({L} layers, {ranks_are})")
    if len({dtypes[key] for key in SAME_DTYPE}) > 1:
        raise AdapterError(f"{wpath}: tensors {', '.join(map(repr, SAME_DTYPE))} must share one dtype, found "
                           + ", ".join(str(dtypes[key]) for key in SAME_DTYPE))
