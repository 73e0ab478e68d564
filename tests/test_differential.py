"""The Python reader (loldu.adapter_io.read_adapter) and the C++ reader (`apply_adapter --check`) give
the same verdict, accept or refuse, on every file of a corpus: the fuzz regression inputs
(tests/data/adapter_fuzz/) and valid adapters saved by Python, then mutated: every config key set to
values of the wrong type or outside its enum (task_type="FOO" included), header fields, tensors' dtypes,
shapes, names and values, broken hashes, format tags and truncations. Mutations that change the config
or a tensor are re-signed (both hashes recomputed), so they reach the checks behind the hashes.

Left out on purpose: a str target_modules that is not a valid Python regular expression, which only
the Python reader can tell (adapter_file.h says so).
"""
import copy
import hashlib
import json
import re
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from test_cpp_embedding import FUZZ_CASES, app, run  # noqa: F401  (app: the fixture that builds apply_adapter)

import loldu
from loldu import LoLDUConfig, spec
from loldu.adapter_io import read_adapter
from loldu.errors import AdapterError

# -- the safetensors container, as bytes <-> (metadata, {name: (dtype, shape, bytes)}) -----------------


def split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    data = raw[8 + n :]
    tensors = {k: [v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]] for k, v in header.items()}
    return meta, tensors


def join(meta: dict, tensors: dict) -> bytes:
    header, blobs, at = {"__metadata__": meta}, [], 0
    for k in sorted(tensors):
        dtype, shape, data = tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def data_hash(tensors: dict) -> str:
    """adapter_io's data hash over the raw records (dtype names from the spec)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        dtype, shape, data = tensors[k]
        h.update(f"{k}|{spec.TORCH_NAMES.get(dtype, 'torch.unknown')}|{tuple(shape)}|".encode() + data)
    return h.hexdigest()


def signed(meta: dict, tensors: dict, header: dict, rehash_data: bool = True) -> bytes:
    meta, header = dict(meta), copy.deepcopy(header)
    if rehash_data and isinstance(header, dict):
        header["data_sha256"] = data_hash(tensors)
    text = json.dumps(header, indent=1)
    meta[spec.META_CONFIG] = text
    meta[spec.META_CONFIG_SHA256] = hashlib.sha256(text.encode()).hexdigest()
    return join(meta, tensors)


# -- the valid adapters the mutations start from -------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(2, 4, 3)
        self.encoder = nn.Linear(6, 5)
        self.classifier = nn.Linear(5, 3)


def valid_adapters(tmp: Path) -> dict:
    torch.manual_seed(0)
    configs = {
        "plain": LoLDUConfig(rank=2, target_modules=["emb", "conv", "encoder"], train_scale=True),
        "head": LoLDUConfig(rank=2, target_modules=["encoder"], task_type="SEQ_CLS", parametrization="relative",
                            factor_storage="cur", form="dense", factor_dtype="float64"),
        # per-layer ranks and scales: z and pivots ragged (format 4), sigma0 = alpha / r per layer
        "ragged": LoLDUConfig(rank="full", target_modules=["emb", "conv", "encoder"], rank_pattern={"c.nv": 3},
                              alpha_pattern={"encoder": 2.5}, parametrization="relative", train_scale=True),
    }
    out = {}
    for name, config in configs.items():
        model = loldu.inject(Net(), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        loldu.save_adapter(model, tmp / name)
        out[name] = (tmp / name / spec.WEIGHTS_NAME).read_bytes()
    out["v2"] = (FUZZ_CASES / "accept-v2-linear-embedding-conv2d.safetensors").read_bytes()
    out["v3"] = (FUZZ_CASES / "accept-v3-linear-embedding-conv2d.safetensors").read_bytes()
    return out


# -- mutations -------------------------------------------------------------------------------------------

ODD_VALUES = [None, True, False, 0, 1, -1, 2, 3, 1.5, 0.0, -2.5, 1e-45, 3.5e38, 2**70, "", "x", "FOO", "all-linear",
              [], ["encoder"], [""], ["a", 3], {}, {"a": 1}]


def case_variants(v: str) -> list:
    return [v.lower(), v.title(), v.upper() + " ", v.lower().replace("s", "\u017f").replace("i", "\u0131")]


def config_values(key: str) -> list:
    rules = spec.CONFIG_KEYS[key]
    values = list(ODD_VALUES) + list(rules.get("values", ()))
    for v in rules.get("values", ()):
        values += case_variants(v)
    if key == "target_modules":  # only the Python reader knows Python's regular expressions
        values = [v for v in values if not isinstance(v, str) or _compiles(v)]
    if key == "rank_pattern":  # valid, mismatching the stored ranks, past min(d, k), not a regex, bad values
        values += [{"encoder": 2}, {"enc.*": "full"}, {"emb": 3}, {"c.nv": 3}, {"conv": 100}, {"(": 2}, {"encoder": 0},
                   {"encoder": "FULL"}, {"encoder": 2.0}, {"": 2}, {"encoder": "full", "e.*": 1}]
    if key == "rank":
        values += ["full", "Full", 5]
    if key == "alpha_pattern":  # fine, a subnormal sigma0, zero, not finite-able, not a number
        values += [{"encoder": 2.5}, {"encoder": 1e-45}, {".*": 1e-44}, {"encoder": 0}, {"encoder": "2"},
                   {"encoder": True}, {"emb": -3.0, "e.*": 4.0}]
    return values


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def config_mutations(header: dict):
    h = copy.deepcopy(header)
    h["config"]["task_type"] = "FOO"
    yield "config-task_type-FOO", h
    for key in spec.CONFIG_KEYS:
        for i, v in enumerate(config_values(key)):
            h = copy.deepcopy(header)
            h["config"][key] = v
            yield f"config-{key}-{i}", h
        h = copy.deepcopy(header)
        h["config"].pop(key, None)
        yield f"config-{key}-missing", h
    for extra, v in (("r", 2), ("extra", 1), ("Rank", 2)):
        h = copy.deepcopy(header)
        h["config"][extra] = v
        yield f"config-extra-{extra}", h
    for i, v in enumerate([None, [], "x", 3]):
        h = copy.deepcopy(header)
        h["config"] = v
        yield f"config-whole-{i}", h


def header_mutations(header: dict):
    edits = {
        "format": ["x", None, "LOLDU-ADAPTER"],
        "format_version": [2, 3, 3.0, True, "3", None, 4, 1],
        "adapter_name": [5, "", None, "1bad", "a/b", "-x", "a b", "\u00e9", "_ok-2", "\ud800x"],
        "model_class": [5, None, "\udc00", "\U0001f600"],
        "layers": [[], None, "x", {}],
        "saved_modules": [None, [], "x", [{"name": "", "tensors": []}], [{"name": "m", "tensors": [""]}],
                          [{"name": "m"}], [{"name": "m", "tensors": []}, {"name": "m", "tensors": []}]],
        "data_sha256": [None, "0" * 64, 5],
    }
    for key, values in edits.items():
        for i, v in enumerate(values):
            h = copy.deepcopy(header)
            h[key] = v
            yield f"header-{key}-{i}", h
        h = copy.deepcopy(header)
        h.pop(key, None)
        yield f"header-{key}-missing", h
    layer_edits = {"rank": [0, -1, True, 2.0, "2", None, 1, 2, 3, 100, "full", 2**70],
                   "kind": ["foo", 5, None, "bogus", "Linear", *spec.LAYER_KINDS],
                   "dtype": [5, "int8", "float99", "float8_e4m3fn", "torch.float32", *spec.LAYER_DTYPES],
                   "name": [5, "", None, "\ud800x", "x\udfff", "\ud83d\ude00", "\U0001f600"],
                   "shape": [[0, 5], [True, 5], [5, True], [32, True], [False, 5], ["5", 5], [5], [5, 5, 5], [5.0, 6],
                             [-1, 6], None, [2**62, 6], [2**63, 6]]}
    for key, values in layer_edits.items():
        for i, v in enumerate(values):
            h = copy.deepcopy(header)
            h["layers"][0][key] = v
            yield f"layer-{key}-{i}", h
    h = copy.deepcopy(header)
    h["layers"][0].pop("rank", None)
    yield "layer-rank-missing", h
    h = copy.deepcopy(header)
    h["layers"].append(copy.deepcopy(h["layers"][0]))
    yield "layer-repeated", h
    h = copy.deepcopy(header)
    h["layers"][0]["shape"][0] = 1  # every pivot row out of range
    yield "layer-short", h
    if header.get("saved_modules"):
        for i, text in enumerate(["\ud800", "\ud83d\ude00"]):
            h = copy.deepcopy(header)
            h["saved_modules"][0]["tensors"][0] = text
            yield f"saved-tensor-unicode-{i}", h


def _convert(record, dtype: str):
    old, shape, data = record
    values = torch.frombuffer(bytearray(data), dtype=spec.TORCH_DTYPES[old]) if data else torch.empty(0)
    converted = values.to(spec.TORCH_DTYPES[dtype])
    return [dtype, shape, converted.view(torch.uint8).numpy().tobytes() if converted.numel() else b""]


def tensor_mutations(tensors: dict):
    """(name, new tensors) pairs: dtypes, shapes, names and values changed."""
    L = tensors["sigma"][1][0]
    R = tensors["z"][1][0] * (tensors["z"][1][1] if len(tensors["z"][1]) == 2 else 1)
    for key, dtypes in {"z": ["F64", "F16", "BF16", "I32"], "sigma": ["F64", "I32"], "pivots": ["I64", "U8", "F32"],
                        "fingerprint": ["I8", "BOOL"]}.items():
        for dt in dtypes:
            t = copy.deepcopy(tensors)
            t[key] = _convert(t[key], dt)
            yield f"tensor-{key}-dtype-{dt}", t
    # (L, R / L) is format 4's layout before it, [R] the reverse: each refused in the other format
    for key, shape in (("z", [R]), ("z", [R // L, L]), ("z", [L, R // L]), ("z", [R, 1]), ("sigma", [L, 1]),
                       ("sigma", []), ("fingerprint", [L * 32]), ("pivots", [R // L, L]), ("pivots", [R]),
                       ("pivots", [L, R // L]), ("pivots", [1, R])):
        t = copy.deepcopy(tensors)
        if shape == []:
            t[key] = [t[key][0], shape, t[key][2][:4]]
        else:
            t[key] = [t[key][0], shape, t[key][2]]
        yield f"tensor-{key}-shape-{'x'.join(map(str, shape)) or 'scalar'}", t
    for key in list(tensors):
        t = copy.deepcopy(tensors)
        del t[key]
        yield f"tensor-{key}-dropped", t
        t = copy.deepcopy(tensors)
        t["saved.x." + key] = t.pop(key)
        yield f"tensor-{key}-renamed", t
    t = copy.deepcopy(tensors)
    t["extra"] = ["F32", [1], b"\0\0\0\0"]
    yield "tensor-extra", t
    for key, fmt, value in (("z", "<f", float("nan")), ("z", "<f", float("inf")), ("sigma", "<f", float("-inf")),
                            ("pivots", "<i", -1), ("pivots", "<i", 10**6), ("z", "<f", 1e-40)):
        t = copy.deepcopy(tensors)
        t[key][2] = struct.pack(fmt, value) + t[key][2][4:]
        yield f"tensor-{key}-value-{value}", t
    t = copy.deepcopy(tensors)
    p = t["pivots"][2]
    t["pivots"][2] = p[4:8] + p[4:]  # the first pivot repeats the second
    yield "tensor-pivots-repeated", t
    for key in [k for k in tensors if k.startswith(spec.SAVED_PREFIX)]:
        t = copy.deepcopy(tensors)
        t[key][2] = struct.pack("<f", float("nan")) + t[key][2][4:]
        yield f"tensor-{key}-nan", t
        t = copy.deepcopy(tensors)
        t[key] = _convert(t[key], "F16")
        yield f"tensor-{key}-f16", t
        t = copy.deepcopy(tensors)
        t[key] = _convert(t[key], "C64")
        yield f"tensor-{key}-c64", t


def raw_mutations(raw: bytes, meta: dict, tensors: dict, header: dict):
    """Broken hashes, format tags and truncations (not re-signed)."""
    t = copy.deepcopy(tensors)
    t["z"][2] = bytes([t["z"][2][0] ^ 1]) + t["z"][2][1:]
    yield "hash-data", signed(meta, t, header, rehash_data=False)
    m = dict(meta)
    m[spec.META_CONFIG] = m[spec.META_CONFIG].replace('"rank": 2', '"rank": 3')
    yield "hash-config", join(m, tensors)
    for i, tag in enumerate(["loldu-adapter/4", "loldu-adapter/5", "loldu-adapter/3",
                             "loldu-adapter/003", "loldu-adapter/0000003", "loldu-adapter/",
                             "loldu-adapter/3 ", "x", None]):
        m = dict(meta)
        if tag is None:
            del m[spec.META_FORMAT]
        else:
            m[spec.META_FORMAT] = tag
        yield f"format-tag-{i}", join(m, tensors)
    m = {k: v for k, v in meta.items() if k != spec.META_CONFIG_SHA256}
    yield "meta-no-hash", join(m, tensors)
    for i, text in enumerate(["\ud800", "a\udc00b", "\U0001f600"]):  # lone surrogates (escaped by json.dumps)
        yield f"meta-unicode-{i}", join({**meta, "note": text}, tensors)
        t = copy.deepcopy(tensors)
        t[text] = ["F32", [1], b"\0\0\0\0"]
        yield f"tensor-name-unicode-{i}", join(meta, t)
    for cut in (0, 7, 8, 100, len(raw) // 2, len(raw) - 1):
        yield f"truncated-{cut}", raw[:cut]
    yield "trailing", raw + b"\0" * 8


def corpus(bases: dict):
    for case in sorted(FUZZ_CASES.glob("*.safetensors")):
        yield f"fuzz-{case.stem}", case.read_bytes()
    for base, raw in bases.items():
        meta, tensors = split(raw)
        header = json.loads(meta[spec.META_CONFIG])
        yield f"{base}-valid", raw
        yield f"{base}-resigned", signed(meta, tensors, header)
        for name, h in list(config_mutations(header)) + list(header_mutations(header)):
            yield f"{base}-{name}", signed(meta, tensors, h)
        for name, t in tensor_mutations(tensors):
            yield f"{base}-{name}", signed(meta, t, header)
        for name, b in raw_mutations(raw, meta, tensors, header):
            yield f"{base}-{name}", b


def python_verdict(d: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no readable copy beside the file: warned, not needed
        try:
            read_adapter(d)
            return "ok"
        except AdapterError:
            return "refused"


def test_python_and_cpp_readers_agree_on_every_file(app, tmp_path):  # noqa: F811
    bases = valid_adapters(tmp_path / "bases")
    dirs = {}
    for i, (name, raw) in enumerate(corpus(bases)):
        d = tmp_path / "corpus" / f"{i:04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        d.mkdir(parents=True)
        (d / spec.WEIGHTS_NAME).write_bytes(raw)
        dirs[d.name] = d
    res = run(app, "--check", *dirs.values(), ok=False)
    cpp = {}
    for line in res.stdout.splitlines():
        m = re.match(r"(\S+): (ok|refused)", line)
        if m:
            cpp[Path(m.group(1)).name] = m.group(2)
    assert set(cpp) == set(dirs), res.stdout[-2000:] + res.stderr[-2000:]
    python = {name: python_verdict(d) for name, d in dirs.items()}
    differ = [f"{name}: Python {python[name]}, C++ {cpp[name]}" for name in sorted(dirs) if python[name] != cpp[name]]
    assert not differ, "\n".join(differ)
    accepted = sorted(n for n, v in python.items() if v == "ok")
    assert len(dirs) > 400 and 20 < len(accepted) < len(dirs) - 300, (len(dirs), accepted)
    for base in ("plain", "head", "ragged", "v2", "v3"):
        assert any(n.endswith(f"-{base}-valid") for n in accepted), base
    # Per-layer ranks: what the config gives each layer must be the layer's stored rank, in both readers.
    for m, verdict in (("config-rank_pattern-24", "ok"), ("config-rank_pattern-25", "refused"),
                       ("layer-rank-missing", "refused"), ("config-rank-24", "refused"), ("layer-rank-7", "ok"),
                       ("layer-rank-6", "refused")):
        assert [python[n] for n in dirs if n.endswith(f"-plain-{m}")] == [verdict], (m, verdict)
    assert [python[n] for n in dirs if n.endswith("-ragged-config-rank_pattern-27")] == ["ok"]
    assert [python[n] for n in dirs if n.endswith("-ragged-config-rank-24")] == ["ok"]
    assert [python[n] for n in dirs if n.endswith("-v3-config-rank-24")] == ["refused"]  # one rank before format 4
    assert any("task_type" in n for n in accepted) and not any(n.endswith("task_type-FOO") for n in accepted)
    # What the spec forbids in the header is refused at read (not only by a later load), by both.
    forbidden = ["header-adapter_name-3", "header-adapter_name-4", "layer-kind-3", "layer-dtype-2", "layer-shape-3",
                 "layer-name-3", "header-model_class-2", "meta-unicode-0", "tensor-name-unicode-0"]
    for base in ("plain", "head"):
        for m in forbidden + ["saved-tensor-unicode-0"] * (base == "head"):
            assert [python[n] for n in dirs if n.endswith(f"-{base}-{m}")] == ["refused"], (base, m)
        for m in ("header-adapter_name-8", "layer-name-6", "header-model_class-3", "layer-dtype-5"):
            assert [python[n] for n in dirs if n.endswith(f"-{base}-{m}")] == ["ok"], (base, m)
    shutil.rmtree(tmp_path / "corpus")


def test_both_readers_refuse_a_sparse_file_with_a_wrong_tensor_table_unread(app, tmp_path):  # noqa: F811
    """Its size matches its header (4 GiB of holes): both readers refuse it from the header's tensor
    table, well within a timeout that reading 4 GiB would exceed."""
    from test_reliability import sparse_wrong_table

    path = sparse_wrong_table(tmp_path)
    res = subprocess.run([str(app), "--check", str(tmp_path)], capture_output=True, text=True, timeout=20)
    assert f"{tmp_path}: refused" in res.stdout, res.stdout + res.stderr
    assert "expected tensors" in res.stdout + res.stderr and "found ['z']" in res.stdout + res.stderr, res.stdout
    assert python_verdict(tmp_path) == "refused"
    assert path.stat().st_blocks * 512 < 1 << 20  # still a hole: nobody wrote the data
