"""The adapter format's one description (python/loldu/adapter_spec.json, loldu.spec): the generated
C++ header is up to date, the tables agree with torch and safetensors, LoLDUConfig follows the spec's
keys, enums and defaults, and the coefficient formulas give the spec's golden vectors."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import _TYPES as SAFETENSORS_TYPES

from loldu import config as config_module
from loldu import spec
from loldu.config import LoLDUConfig
from loldu.errors import AdapterError
from loldu.layer import coefficients_from

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    path = ROOT / "cpp" / "tools" / "gen_spec_header.py"
    mod_spec = importlib.util.spec_from_file_location("gen_spec_header", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_checked_in_header_is_what_the_generator_writes():
    gen = _generator()
    want = gen.render(json.loads(spec.SPEC_PATH.read_text(encoding="utf-8")))
    have = gen.HEADER.read_text(encoding="utf-8")
    assert have == want, "cpp/include/loldu/spec.h is stale: run python cpp/tools/gen_spec_header.py"
    assert have.startswith("// Generated from python/loldu/adapter_spec.json") and "do not edit" in have.splitlines()[0]
    assert gen.main(["--check"]) == 0


def test_spec_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert f'loldu = ["{spec.SPEC_PATH.name}"]' in section


def test_config_module_reexports_the_spec_constants():
    for name in ("STORAGES", "PARAMETRIZATIONS", "FORMS", "TASK_TYPES", "TASK_HEADS", "ALL_LINEAR"):
        assert getattr(config_module, name) is getattr(spec, name), name
    assert spec.STORAGES == ("full", "cur", "lu") and spec.FORMS == ("auto", "delta", "dense")
    assert spec.TASK_HEADS["QUESTION_ANS"] == ("qa_outputs",) and spec.ALL_LINEAR == "all-linear"


def test_dtype_table_matches_torch_and_safetensors():
    assert {d["safetensors"] for d in spec.DTYPES} == set(SAFETENSORS_TYPES)
    for d in spec.DTYPES:
        dt = spec.TORCH_DTYPES[d["safetensors"]]
        assert SAFETENSORS_TYPES[d["safetensors"]] == dt and str(dt) == spec.TORCH_NAMES[d["safetensors"]]
        assert torch.empty(0, dtype=dt).element_size() == d["size"] == spec.DTYPE_SIZES[d["safetensors"]]
        assert (d["nonfinite"] is not None) == dt.is_floating_point, d


def _patterns(size: int) -> np.ndarray:
    """Every bit pattern of a 1- or 2-byte element; for wider ones the specials and random patterns."""
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    if size <= 2:
        return np.arange(1 << (8 * size), dtype=np.uint64).astype(unsigned)
    bits = 8 * size
    top, exp = (1 << (bits - 1)), (0x7FF << 52 if size == 8 else 0xFF << 23)
    specials = [0, 1, (1 << bits) - 1, top, exp, exp | 1, exp | top, exp - 1, exp >> 1]
    rand = np.random.default_rng(0).integers(0, 1 << 63, 4096, dtype=np.uint64, endpoint=True)
    return np.concatenate([np.array(specials, dtype=np.uint64), rand * 2 + 1, rand]).astype(unsigned)


@pytest.mark.parametrize("name", [d["safetensors"] for d in spec.DTYPES if d["nonfinite"]])
def test_nonfinite_bit_rule_is_torch_isfinite(name):
    """The C++ reader's NaN/Inf test ((bits & mask) == value, loldu/spec.h) agrees with torch.isfinite."""
    d = next(d for d in spec.DTYPES if d["safetensors"] == name)
    mask, value = (int(x, 16) for x in d["nonfinite"])
    bits = _patterns(d["size"])
    signed = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[d["size"]]
    values = torch.from_numpy(bits.view(signed).copy()).view(spec.TORCH_DTYPES[name])
    flagged = (bits & bits.dtype.type(mask)) == bits.dtype.type(value)
    assert flagged.tolist() == (~torch.isfinite(values.double())).tolist()


def test_upper_non_ascii_is_pythons_str_upper():
    """task_type is matched in any case; C++ mirrors str.upper() with this table for the code points
    outside ASCII that upper-case into ASCII."""
    table = {}
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        up = chr(cp).upper()
        if up.isascii():
            table[chr(cp)] = up
    assert table == spec.SPEC["config"]["upper_non_ascii"]
    assert LoLDUConfig(target_modules=["q"], task_type="\u017feq_cls").task_type == "SEQ_CLS"


def test_tensor_table():
    assert spec.tensor_table([5, 5, 5], 3) == {"z": (torch.float32, (3, 5)), "sigma": (torch.float32, (3,)),
                                               "pivots": (torch.int32, (3, 5)), "fingerprint": (torch.uint8, (3, 32))}
    # From format 4 z and pivots are the layers' vectors concatenated: ragged ranks allowed.
    assert spec.FORMAT_VERSION == spec.RAGGED_FROM == 4
    assert spec.tensor_table([5, 2, 7]) == {"z": (torch.float32, (14,)), "sigma": (torch.float32, (3,)),
                                            "pivots": (torch.int32, (14,)), "fingerprint": (torch.uint8, (3, 32))}
    with pytest.raises(ValueError, match="one rank for all layers"):
        spec.tensor_table([5, 2], 3)
    assert spec.SAVED_PREFIX == "saved." and spec.TENSOR_NAMES == ("z", "sigma", "pivots", "fingerprint")


def test_config_defaults_and_enums_are_the_spec():
    c = LoLDUConfig(target_modules=["q"])
    for key, default in spec.CONFIG_DEFAULTS.items():
        if key != "target_modules":
            assert getattr(c, key) == default, key
    assert type(c.rank) is int
    d = c.to_dict()
    assert not set(spec.OMITTED_AT_DEFAULT) & set(d)
    assert set(d) == {f.name for f in dataclasses.fields(LoLDUConfig) if not f.name.startswith("_")} - set(
        spec.OMITTED_AT_DEFAULT)
    for key, rules in spec.CONFIG_KEYS.items():
        for v in rules.get("values", ()):
            assert getattr(LoLDUConfig(target_modules=["q"], **{key: v}), key) == v
        if "values" in rules:
            with pytest.raises(AdapterError, match=key):
                LoLDUConfig(target_modules=["q"], **{key: "FOO"})


def test_explicit_rank_must_agree_with_r():
    with pytest.raises(AdapterError, match="r=4 and rank=8 disagree"):
        LoLDUConfig(rank=8, r=4, target_modules=["q"])
    assert LoLDUConfig(rank=8, r=8, target_modules=["q"]).rank == 8
    assert LoLDUConfig(r=4, target_modules=["q"]).rank == 4
    c = LoLDUConfig(target_modules=["q"])
    assert c.rank == 8 and c.to_dict()["rank"] == 8 and json.dumps(c.to_dict())
    assert LoLDUConfig.from_dict(c.to_dict()) == c
    assert dataclasses.replace(c, form="dense").rank == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_match_the_golden_vectors(dtype):
    """layer.coefficients_from (Python) gives the spec's c bit for bit; cpp/tests/test_merge.cpp checks
    loldu::coefficients (C++) against the same vectors."""
    assert len(spec.COEFFICIENT_VECTORS) >= 4
    assert {v["parametrization"] for v in spec.COEFFICIENT_VECTORS} == set(spec.PARAMETRIZATIONS)
    for v in spec.COEFFICIENT_VECTORS:
        z = torch.tensor(v["z"], dtype=torch.float32).to(dtype)
        D = torch.tensor(v["D"], dtype=torch.float32).to(dtype)
        sigma = torch.tensor(v["sigma"], dtype=torch.float32).to(dtype)
        c = coefficients_from(z, sigma, D, v["sigma0"], v["parametrization"])
        want = v["c_float32"] if dtype == torch.float32 else v["c_float64"]
        assert c.dtype == dtype and c.tolist() == want, v


def test_header_generator_runs_without_loldu():
    """The generator is plain Python: it must not need torch or the package (it runs before a build)."""
    source = (ROOT / "cpp" / "tools" / "gen_spec_header.py").read_text()
    assert "import torch" not in source and "import loldu" not in source and "from loldu" not in source
