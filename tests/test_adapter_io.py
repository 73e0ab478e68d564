"""save_adapter / load_adapter: round trips, refusals (model and files unchanged), atomic writes."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, assert_same_snapshot, inputs, perturb, snapshot
from safetensors.torch import load_file

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME


def trained(base, rank=3, **kw):
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=rank, target_modules=TARGETS, **kw))
    perturb(model, sigma=kw.get("train_scale", False))
    return model


def files(d):
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def test_io_round_trip_into_plain_base_is_identical(tmp_path):
    base = TinyNet()
    model = trained(base, rank=4, train_scale=True, alpha=2.0)
    sizes = loldu.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sizes == {n: (tmp_path / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)}
    # contents: per layer z, sigma, pivots (int64) and a fingerprint; nothing of size d or k
    t = load_file(tmp_path / WEIGHTS_NAME)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "z": (torch.float32, (5, 4)), "sigma": (torch.float32, (5,)),
        "pivots": (torch.int32, (5, 4)), "fingerprint": (torch.uint8, (5, 32))}
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["config"]["rank"] == 4 and [e["name"] for e in cfg["layers"]] == TARGETS
    fresh = copy.deepcopy(base)
    loaded = loldu.load_adapter(fresh, tmp_path)
    assert loaded is fresh and loldu.active_adapter(fresh) == "default"
    ids, img = inputs()
    for a, b in zip(fresh(ids, img), model(ids, img)):
        assert torch.equal(a, b)
    for (n, la), (_, lb) in zip(loldu.adapted_layers(fresh), loldu.adapted_layers(model)):
        for buf in ("loldu_PL", "loldu_U", "loldu_D", "loldu_pivots"):
            assert torch.equal(getattr(la, buf), getattr(lb, buf)), (n, buf)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)


def test_io_load_as_second_adapter(tmp_path):
    base = TinyNet()
    a = trained(base)
    loldu.save_adapter(a, tmp_path / "a")
    b = trained(base)
    loldu.load_adapter(b, tmp_path / "a", adapter_name="from_a")
    assert loldu.adapter_names(b) == ["default", "from_a"] and loldu.active_adapter(b) == "default"
    loldu.set_adapter(b, "from_a")
    ids, img = inputs()
    for x, y in zip(b(ids, img), a(ids, img)):
        assert torch.equal(x, y)
    with pytest.raises(AdapterError, match="already has an adapter 'from_a'"):
        loldu.load_adapter(b, tmp_path / "a", adapter_name="from_a")


def test_io_save_named_adapter_and_refuse_merged(tmp_path):
    base = TinyNet()
    m = trained(base)
    loldu.add_adapter(m, "other")
    perturb(m, "other")
    loldu.save_adapter(m, tmp_path / "o", adapter_name="other")
    fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "o")
    assert loldu.adapter_names(fresh) == ["other"]
    loldu.set_adapter(m, "other")
    ids, img = inputs()
    assert torch.equal(fresh(ids, img)[0], m(ids, img)[0])
    loldu.merge(m)
    with pytest.raises(AdapterError, match="merged"):
        loldu.save_adapter(m, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _refused(model, directory, *words, **kw):
    before = snapshot(model)
    on_disk = files(directory)
    with pytest.raises(AdapterError) as e:
        loldu.load_adapter(model, directory, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert_same_snapshot(before, snapshot(model))
    assert files(directory) == on_disk
    return msg


def test_io_refuses_a_different_base(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.proj.weight[1, 0] += 1e-3  # Conv1D: W0 = weight^T, so this is W0[0, 1], inside W0[:, :r]
    _refused(other, tmp_path, str(tmp_path / CONFIG_NAME), "'proj'", "fingerprint")
    # the same check on an already injected model
    injected = loldu.inject(copy.deepcopy(other), LoLDUConfig(rank=3, target_modules=TARGETS))
    _refused(injected, tmp_path, "'proj'", "fingerprint", adapter_name="second")


def test_io_refuses_missing_extra_and_reshaped_layers(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    missing = copy.deepcopy(base)
    missing.fc2 = nn.Identity()  # the config still targets 'fc2'
    _refused(missing, tmp_path, "'fc2'", str(tmp_path))
    extra = copy.deepcopy(base)
    extra.head = nn.Module()
    extra.head.fc1 = nn.Linear(24, 7)  # also matched by the suffix 'fc1'
    _refused(extra, tmp_path, "'head.fc1'", "absent from the adapter")
    reshaped = copy.deepcopy(base)
    reshaped.fc1 = nn.Linear(24, 33)
    _refused(reshaped, tmp_path, "'fc1'", "(33, 24)")
    retyped = copy.deepcopy(base)
    retyped.fc1 = nn.Conv2d(24, 32, 1)
    _refused(retyped, tmp_path, "'fc1'", "conv2d")
    half = copy.deepcopy(base).to(torch.float64)
    _refused(half, tmp_path, "dtype")


def _corrupt_data_byte(d):
    raw = bytearray((d / WEIGHTS_NAME).read_bytes())
    raw[-40] ^= 0x01  # inside the tensor data (the header comes first)
    (d / WEIGHTS_NAME).write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, word", [
    (_corrupt_data_byte, "corrupted"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-9]), WEIGHTS_NAME),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\xff" * 4), "truncated"),
    (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text().replace('"rank": 3', '"rank": 2')), "config hash"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "no such adapter file"),
])
def test_io_refuses_corrupted_files(tmp_path, damage, word):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    damage(tmp_path)
    fresh = copy.deepcopy(base)
    msg = _refused(fresh, tmp_path, word)
    assert str(tmp_path) in msg
    assert not loldu.adapted_layers(fresh)


def test_io_refuses_mixed_up_pair(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path / "a")
    loldu.save_adapter(trained(base), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    _refused(copy.deepcopy(base), tmp_path / "a", "does not belong")


def test_io_save_is_atomic(tmp_path, monkeypatch):
    base = TinyNet()
    m = trained(base)
    loldu.save_adapter(m, tmp_path)
    good = files(tmp_path)
    perturb(m)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        loldu.save_adapter(m, tmp_path)
    assert files(tmp_path) == good  # old files intact, no temporary files left behind
    monkeypatch.undo()
    loldu.save_adapter(m, tmp_path)
    assert files(tmp_path) != good and sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_io_file_holds_no_pickle_and_is_small(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw  # safetensors, not a pickle
    assert sum(len(v) for v in files(tmp_path).values()) < 4096


def test_io_save_second_file_failure_keeps_old_pair(tmp_path, monkeypatch):
    base = TinyNet()
    m = trained(base)
    loldu.save_adapter(m, tmp_path)
    good = files(tmp_path)
    perturb(m)
    real_fsync, calls = os.fsync, []

    def second_fails(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full on the second file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(OSError, match="second file"):
        loldu.save_adapter(m, tmp_path)
    monkeypatch.undo()
    assert files(tmp_path) == good  # the old pair, whole; no temporary files
    loldu.load_adapter(copy.deepcopy(base), tmp_path)


def test_io_saved_files_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        loldu.save_adapter(trained(TinyNet()), tmp_path)
    finally:
        os.umask(old)
    for n in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / n).stat().st_mode & 0o777 == 0o644


def test_io_refuses_crafted_0dim_tensor_as_adapter_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    t = load_file(tmp_path / WEIGHTS_NAME)
    t["sigma"] = torch.tensor(0.25)  # 0-dim: hashing it raw would raise RuntimeError
    save_file(t, str(tmp_path / WEIGHTS_NAME), metadata=meta)
    _refused(copy.deepcopy(base), tmp_path, "tensor 'sigma'")
