"""save_adapter / load_adapter: round trips, refusals (model and files unchanged), atomic writes."""
import copy
import hashlib
import json
import os
import random
import re
import time
import warnings

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, assert_same_snapshot, inputs, perturb, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME, AdapterWarning, read_adapter


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
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert sizes == {n: (tmp_path / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)}
    # contents: per layer z, sigma, pivots (int64) and a fingerprint; nothing of size d or k
    t = load_file(tmp_path / WEIGHTS_NAME)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "z": (torch.float32, (20,)), "sigma": (torch.float32, (5,)),
        "pivots": (torch.int32, (20,)), "fingerprint": (torch.uint8, (5, 32))}
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["config"]["rank"] == 4 and [e["name"] for e in cfg["layers"]] == TARGETS
    assert [e["rank"] for e in cfg["layers"]] == [4] * 5
    # format 4: the weights file holds the config too; loldu_config.json is a byte-identical copy
    meta = metadata(tmp_path)
    assert meta["loldu_format"] == "loldu-adapter/4" and meta["loldu_config"] == (tmp_path / CONFIG_NAME).read_text()
    fresh = copy.deepcopy(base)
    loaded = loldu.load_adapter(fresh, tmp_path)
    assert loaded is fresh and loldu.active_adapter(fresh) == "default"
    ids, img = inputs()
    for a, b in zip(fresh(ids, img), model(ids, img)):
        assert torch.equal(a, b)
    for (n, la), (_, lb) in zip(loldu.adapted_layers(fresh), loldu.adapted_layers(model)):
        for buf in ("loldu_PL", "loldu_U", "loldu_D", "loldu_pivots"):
            assert torch.equal(getattr(la, buf), getattr(lb, buf)), (n, buf)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference: frozen (PEFT's default)
    again = loldu.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert sorted(n for n, p in again.named_parameters() if p.requires_grad) == sorted(
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


def metadata(d):
    with safe_open(str(d / WEIGHTS_NAME), "pt") as f:
        return f.metadata()


def rewrite_metadata(d, **changes):
    meta = {**metadata(d), **changes}
    save_file(load_file(d / WEIGHTS_NAME), str(d / WEIGHTS_NAME), metadata=meta)


def stacked_tensors(header: dict, tensors: dict) -> dict:
    """A format-4 adapter's tensors as formats 1 to 3 stored them (one rank: z and pivots (L, r)); the
    layer entries lose their rank and data_sha256 is recomputed."""
    from loldu.adapter_io import _data_hash
    ranks = {e.pop("rank") for e in header["layers"]}
    assert len(ranks) == 1
    out = {k: (t.reshape(len(header["layers"]), -1) if k in ("z", "pivots") else t) for k, t in tensors.items()}
    header["data_sha256"] = _data_hash(out)
    return out


def to_format_1(d):
    """Rewrites a format-4 directory (no saved modules, one rank) as format 1 wrote it: the config only
    in adapter_config.json, whose sha256 the weights' metadata records."""
    header = json.loads(metadata(d)["loldu_config"])
    header["format_version"] = 1
    assert header.pop("saved_modules") == []
    tensors = stacked_tensors(header, load_file(d / WEIGHTS_NAME))
    config_bytes = json.dumps(header, indent=1).encode()
    (d / CONFIG_NAME).unlink()
    (d / LEGACY_CONFIG_NAME).write_bytes(config_bytes)
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt", "loldu_format": "loldu-adapter/1",
                                                        "config_sha256": hashlib.sha256(config_bytes).hexdigest()})


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
    _refused(other, tmp_path, str(tmp_path / WEIGHTS_NAME), "'proj'", "fingerprint")
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


def _edit_stored_config(d, old, new):
    """Edits the config inside the weights file, keeping its length (a bit rot, not a re-save)."""
    raw = (d / WEIGHTS_NAME).read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    (d / WEIGHTS_NAME).write_bytes(raw.replace(old, new))


def _deeply_nested(d):
    text = "[" * 100000 + "]" * 100000
    rewrite_metadata(d, loldu_config=text, loldu_config_sha256=hashlib.sha256(text.encode()).hexdigest())


def _nested_safetensors_header(d):
    header = b"[" * 100000 + b"]" * 100000
    (d / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("fmt", [2, 1])
@pytest.mark.parametrize("damage, word", [
    (_corrupt_data_byte, "corrupted"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-9]), WEIGHTS_NAME),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\xff" * 4), "truncated"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "no such adapter file"),
    (_nested_safetensors_header, "nested too deeply"),
    (lambda d: rewrite_metadata(d, loldu_format="loldu-adapter/9"), "format_version 9 is not supported"),
])
def test_io_refuses_corrupted_files(tmp_path, damage, word, fmt):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    if fmt == 1:
        to_format_1(tmp_path)
    damage(tmp_path)
    fresh = copy.deepcopy(base)
    msg = _refused(fresh, tmp_path, word)
    assert str(tmp_path) in msg
    assert not loldu.adapted_layers(fresh)


@pytest.mark.parametrize("damage, word", [
    (lambda d: _edit_stored_config(d, b'\\"rank\\": 3,', b'\\"rank\\": 2,'), "does not match its hash"),
    (lambda d: _edit_stored_config(d, b'\\"conv2d\\"', b'\\"conv3d\\"'), "does not match its hash"),
    (lambda d: rewrite_metadata(d, loldu_config_sha256="0" * 64), "does not match its hash"),
    (_deeply_nested, "nested too deeply"),
    (lambda d: rewrite_metadata(d, loldu_config="{not json", loldu_config_sha256=hashlib.sha256(b"{not json").hexdigest()),
     "not valid JSON"),
])
def test_io_refuses_a_damaged_stored_config(tmp_path, damage, word):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    damage(tmp_path)
    msg = _refused(copy.deepcopy(base), tmp_path, word, str(tmp_path / WEIGHTS_NAME))
    assert "\n" not in msg


def test_io_random_bit_flips_never_load_another_adapter(tmp_path):
    """Any single flipped bit in the weights file is refused, or (in safetensors' own `format`
    entry, which nothing reads) changes nothing: never a silently different adapter."""
    base = TinyNet()
    m = trained(base, train_scale=True)
    loldu.save_adapter(m, tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    ids, img = inputs()
    want = m(ids, img)[0]
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    refused = 0
    for _ in range(150):
        raw = bytearray(good)
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        (tmp_path / WEIGHTS_NAME).write_bytes(bytes(raw))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AdapterWarning)
                fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path)
        except AdapterError:
            refused += 1
            continue
        assert torch.equal(fresh(ids, img)[0], want), f"byte {i}: a flipped bit loaded a different adapter"
    assert refused >= 140


@pytest.mark.parametrize("damage", [
    lambda d: (d / CONFIG_NAME).write_text("{not json"),
    lambda d: (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text().replace('"rank": 3', '"rank": 2')),
    lambda d: (d / CONFIG_NAME).write_text("[" * 100000 + "]" * 100000),
    lambda d: (d / CONFIG_NAME).unlink(),
    lambda d: (d / CONFIG_NAME).write_bytes((d.parent / "other" / CONFIG_NAME).read_bytes()),
])
def test_io_config_copy_is_ignored_when_it_differs(tmp_path, damage):
    """Format 2: the weights file decides; a stale or edited adapter_config.json is reported, not used."""
    base = TinyNet()
    m = trained(base)
    loldu.save_adapter(m, tmp_path / "a")
    loldu.save_adapter(trained(base, rank=2), tmp_path / "other")
    damage(tmp_path / "a")
    with pytest.warns(AdapterWarning, match=CONFIG_NAME):
        fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "a")
    ids, img = inputs()
    assert torch.equal(fresh(ids, img)[0], m(ids, img)[0])
    loldu.save_adapter(fresh, tmp_path / "a")  # the next save rewrites the copy
    assert (tmp_path / "a" / CONFIG_NAME).read_text() == metadata(tmp_path / "a")["loldu_config"]


def test_io_mixed_up_pair_loads_the_weights_file(tmp_path):
    """Format 2: weights copied from another adapter are a complete adapter of their own."""
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path / "a")
    b = trained(base)
    loldu.save_adapter(b, tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.warns(AdapterWarning, match="differs"):
        fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "a")
    ids, img = inputs()
    assert torch.equal(fresh(ids, img)[0], b(ids, img)[0])


def test_io_reads_format_1(tmp_path):
    base = TinyNet()
    m = trained(base, train_scale=True)
    loldu.save_adapter(m, tmp_path / "a")
    to_format_1(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 1 has no stored copy to compare with
        fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "a")
    ids, img = inputs()
    assert torch.equal(fresh(ids, img)[0], m(ids, img)[0])


@pytest.mark.parametrize("damage, word", [
    (lambda d: (d / LEGACY_CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / LEGACY_CONFIG_NAME).write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    (lambda d: (d / LEGACY_CONFIG_NAME).write_text(
        (d / LEGACY_CONFIG_NAME).read_text().replace('"rank": 3', '"rank": 2')), "config hash"),
    (lambda d: (d / LEGACY_CONFIG_NAME).unlink(), "no such adapter file"),
])
def test_io_format_1_refuses_a_damaged_config(tmp_path, damage, word):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    to_format_1(tmp_path)
    damage(tmp_path)
    msg = _refused(copy.deepcopy(base), tmp_path, word)
    assert str(tmp_path) in msg and "\n" not in msg


def test_io_format_1_refuses_mixed_up_pair(tmp_path):
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path / "a")
    loldu.save_adapter(trained(base), tmp_path / "b")
    for d in ("a", "b"):
        to_format_1(tmp_path / d)
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
    with pytest.raises(AdapterError, match=f"{tmp_path}.*disk full"):
        loldu.save_adapter(m, tmp_path)
    assert files(tmp_path) == good  # old files intact, no temporary files left behind
    monkeypatch.undo()
    loldu.save_adapter(m, tmp_path)
    assert files(tmp_path) != good and sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


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
    with pytest.raises(AdapterError, match="second file"):
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
    base = TinyNet()
    loldu.save_adapter(trained(base), tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    t = load_file(tmp_path / WEIGHTS_NAME)
    t["sigma"] = torch.tensor(0.25)  # 0-dim: hashing it raw would raise RuntimeError
    save_file(t, str(tmp_path / WEIGHTS_NAME), metadata=meta)
    _refused(copy.deepcopy(base), tmp_path, "tensor 'sigma'")


def _as_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "proc"])
def test_io_save_file_system_errors_are_adapter_errors(tmp_path, where):
    """Paths that fail for root too: below a regular file, a regular file, a directory in /proc."""
    (tmp_path / "plain").write_text("x")
    target = {"under_a_file": tmp_path / "plain" / "sub", "is_a_file": tmp_path / "plain",
              "proc": "/proc/self" if os.path.isdir("/proc/self") else None}[where]
    if target is None:
        pytest.skip("no /proc")
    with pytest.raises(AdapterError) as e:
        loldu.save_adapter(trained(TinyNet()), target)
    assert str(target) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(_as_root(), reason="root writes into read-only directories")
def test_io_read_only_directory_is_adapter_error(tmp_path):
    m = trained(TinyNet())
    loldu.save_adapter(m, tmp_path / "ro")
    good = files(tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(AdapterError, match="PermissionError"):
            loldu.save_adapter(m, tmp_path / "ro")
        assert files(tmp_path / "ro") == good
        os.chmod(tmp_path / "ro" / WEIGHTS_NAME, 0)
        with pytest.raises(AdapterError, match="cannot read"):
            loldu.load_adapter(TinyNet(), tmp_path / "ro")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


@pytest.mark.parametrize("where", ["file", "weights_is_a_dir", "missing"])
def test_io_load_file_system_errors_are_adapter_errors(tmp_path, where):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "d" / WEIGHTS_NAME).mkdir(parents=True)
    directory = {"file": tmp_path / "plain", "weights_is_a_dir": tmp_path / "d", "missing": tmp_path / "nope"}[where]
    with pytest.raises(AdapterError, match="no such adapter file") as e:
        loldu.load_adapter(TinyNet(), directory)
    assert str(directory / WEIGHTS_NAME) in str(e.value)


def test_io_save_removes_stale_temporaries_only(tmp_path):
    """Killed writers' temporaries go at the next save; a live writer's (flocked) one, a fresh empty
    one of a live process (it may not have locked it yet) and other files stay."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    base = TinyNet()
    m = trained(base)
    loldu.save_adapter(m, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    me, dead, hours_ago = os.getpid(), gone.pid, time.time() - 7200
    W, C = WEIGHTS_NAME, CONFIG_NAME
    remove = {  # name: (content, mtime)
        f".{W}.{dead}-ab3_9xyz.tmp": (b"partial", None),    # killed while writing
        f".{C}.{me}-k2m4q8r0.tmp": (b"partial", None),      # unlocked and written: its writer is gone
        f".{W}.{dead}-e0e0e0e0.tmp": (b"", None),           # killed before writing
        f".{C}.{me}-e1e1e1e1.tmp": (b"", hours_ago),        # empty for hours
        f".{W}.ab3_9xyz.tmp": (b"partial", hours_ago),      # an older loldu's (unlocked) temporary
    }
    keep = {
        f".{W}.{me}-new00000.tmp": (b"", None),             # created by a live process, not locked yet
        f".{W}.abcdefgh.tmp": (b"partial", None),           # an older loldu's, maybe still writing
        f".{W}.tmp": (b"x", hours_ago), f".{W}.{dead}-ABCDEFGH.tmp": (b"x", hours_ago),
        f".{W}.abc.tmp": (b"x", hours_ago), f".other.{dead}-abcdefgh.tmp": (b"x", hours_ago), "notes.tmp": (b"x", hours_ago),
    }
    live = f".{W}.{dead}-live0000.tmp"
    for n, (data, mtime) in {**remove, **keep, live: (b"partial", hours_ago)}.items():
        (tmp_path / n).write_bytes(data)
        if mtime:
            os.utime(tmp_path / n, (mtime, mtime))
    with open(tmp_path / live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # as a writer in another process holds it
        perturb(m)
        loldu.save_adapter(m, tmp_path)
        left = set(os.listdir(tmp_path))
    assert left == {CONFIG_NAME, WEIGHTS_NAME, live, *keep}
    loldu.load_adapter(copy.deepcopy(base), tmp_path)


# -- Cost of a read: linear in the number of layers and of saved tensors -------------------------------
def _synthetic_adapter(d, layers: int, saved: int = 0, rank: int = 4, bad_layer=None):
    """A valid adapter file written straight from tensors: `layers` 32x16 linear layers at `rank`, and
    a saved module of `saved` small tensors (no model: a model of 40k layers would dominate the test).
    bad_layer: (index, what) makes that layer's pivots repeat ("pivots") or its c overflow ("c")."""
    from safetensors.torch import save as st_save

    from loldu import adapter_io, spec
    g = torch.Generator().manual_seed(random.randrange(2**31))
    tensors = {"z": torch.randn(layers, rank, generator=g) * 0.1, "sigma": torch.rand(layers, generator=g) + 0.1,
               "pivots": torch.argsort(torch.rand(layers, 32, generator=g), dim=1)[:, :rank].to(torch.int32),
               "fingerprint": torch.randint(0, 256, (layers, 32), dtype=torch.uint8, generator=g)}
    if bad_layer is not None:
        i, what = bad_layer
        if what == "pivots":
            tensors["pivots"][i, 1] = tensors["pivots"][i, 0]
        else:
            tensors["z"][i, 2] = 3e38  # sigma z = 3e38 sigma, far past the bound
    names = [f"blocks.{i}.proj" for i in range(layers)]
    for key in ("z", "pivots"):  # the layers' vectors concatenated (format 4)
        tensors[key] = tensors[key].reshape(-1)
    for j in range(saved):
        tensors[f"{spec.SAVED_PREFIX}head.t{j}"] = torch.randn(3, generator=g)
    config = LoLDUConfig(rank=rank, target_modules=names, modules_to_save=["head"] if saved else None)
    header = {"format": spec.FORMAT, "format_version": spec.FORMAT_VERSION, "adapter_name": "default",
              "model_class": "Synthetic", "config": config.to_dict(), "data_sha256": adapter_io._data_hash(tensors),
              "layers": [{"name": n, "kind": "linear", "shape": [32, 16], "dtype": "float32", "rank": rank} for n in names],
              "saved_modules": [{"name": "head", "tensors": [f"t{j}" for j in range(saved)]}] if saved else []}
    text = adapter_io._dumps(header)
    meta = {"format": "pt", spec.META_FORMAT: f"{spec.FORMAT}/{spec.FORMAT_VERSION}", spec.META_CONFIG: text,
            spec.META_CONFIG_SHA256: hashlib.sha256(text.encode()).hexdigest()}
    os.makedirs(d, exist_ok=True)
    (d / WEIGHTS_NAME).write_bytes(st_save(tensors, metadata=meta))
    (d / CONFIG_NAME).write_text(text)
    return names


@pytest.mark.parametrize("what", ["pivots", "c"])
def test_a_bad_layer_among_many_is_named(tmp_path, what):
    """The checks run on the whole (L, r) tensors, and still name the first bad layer."""
    names = _synthetic_adapter(tmp_path, 300, bad_layer=(217, what))
    word = "pivots must be 4 distinct rows in [0, 32)" if what == "pivots" else "coefficient c[2] is out of bounds"
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME}: layer '{names[217]}': .*{re.escape(word)}"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("kind", ["layers", "saved tensors"])
def test_read_cost_grows_linearly(tmp_path, kind):
    """Reading 4x the layers (or saved tensors) costs about 4x, far below the 16x of a quadratic step:
    the per-layer checks are whole-tensor operations (best of 3 reads of each size)."""
    cost = {}
    small = 10_000 if kind == "layers" else 5_000  # a saved tensor costs more to write than a layer
    for n in (small, 4 * small):
        d = tmp_path / str(n)
        _synthetic_adapter(d, n, 0) if kind == "layers" else _synthetic_adapter(d, 2, n)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            read_adapter(d)
            runs.append(time.perf_counter() - t0)
        cost[n] = min(runs)
    assert cost[4 * small] / cost[small] < 8, cost
