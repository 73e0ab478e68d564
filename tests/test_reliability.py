"""Nothing silent, nothing hangs: adversarial cases against the Python package.

c out of bounds (the adapter spec's c_check) at save, load, merge, in ONNX Runtime feeds and in
`loldu inspect`; special files (FIFO, /dev/zero, sparse gigabytes) where an adapter file is read;
stale frozen factors after an in-place edit of the base weight; fp64 adapters saved as fp64; float8
weights; over-long names; adapter_ids on seq-first models; PEFT-wrapped layers; the adapter name
pattern of the spec.
"""
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, inputs, perturb
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import loldu
from loldu import adapter_io, atomic, spec
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterWarning, read_adapter
from loldu.errors import AdapterError

ROOT = Path(__file__).resolve().parents[1]
HUGE = 3e38  # finite in fp32; sigma * z is not


def files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def injected(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = TinyNet().to(dtype)
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=3, target_modules=TARGETS, **kw))
    perturb(model)
    return base, model


def resign(d: Path, edit, edit_header=None) -> None:
    """Rewrites d's adapter file with `edit(tensors)` (and `edit_header(header)`) applied and every hash
    recomputed (a file a buggy or hostile writer could produce: only the checks behind the hashes can
    refuse it)."""
    raw = (d / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    tensors = st_load(raw)
    edit(tensors)
    header = json.loads(meta[spec.META_CONFIG])
    if edit_header is not None:
        edit_header(header)
    header["data_sha256"] = adapter_io._data_hash(tensors)
    text = adapter_io._dumps(header)
    meta[spec.META_CONFIG], meta[spec.META_CONFIG_SHA256] = text, hashlib.sha256(text.encode()).hexdigest()
    (d / WEIGHTS_NAME).write_bytes(st_save(tensors, metadata=meta))
    (d / CONFIG_NAME).write_text(text)


def run_python(code: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loldu", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, *words):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


# -- 1. c finite and bounded ---------------------------------------------------------------------------
@pytest.mark.parametrize("parametrization", ["paper", "relative"])
def test_save_refuses_c_out_of_bounds_and_writes_nothing(tmp_path, parametrization):
    _, model = injected(parametrization=parametrization)
    with torch.no_grad():
        model.fc2.loldu_z["default"].fill_(HUGE)
        model.fc2.loldu_sigma["default"].fill_(HUGE)
    with pytest.raises(AdapterError, match=r"layer 'fc2'.*out of bounds.*nothing was written"):
        loldu.save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # Finite z within fp32, sigma at its initial value: c = sigma0 (z - D) alone breaks the bound.
    with torch.no_grad():
        model.fc2.loldu_sigma["default"].fill_(model.fc2.sigma0["default"])
        model.fc2.loldu_z["default"].fill_(1e31 / model.fc2.sigma0["default"])
    with pytest.raises(AdapterError, match=r"layer 'fc2'"):
        loldu.save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_bound_is_the_spec_s_and_a_c_just_inside_it_is_kept(tmp_path):
    """|sigma z| = C_ABS_MAX exactly passes; the next float64 above it is refused (the spec's rule,
    checked in float64 on the stored values)."""
    from loldu.integrity import c_terms_refusal

    z = torch.tensor([0.5, -2.0], dtype=torch.float64)
    assert c_terms_refusal(z, spec.C_ABS_MAX / 2, 0.1, "paper") is None
    above = float(torch.nextafter(torch.tensor(spec.C_ABS_MAX / 2, dtype=torch.float64), torch.tensor(1e300)))
    assert "c[1]" in c_terms_refusal(z, above, 0.1, "paper")
    assert "c[0]" in c_terms_refusal(torch.tensor([float("nan"), 1.0]), 1.0, 0.1, "relative")
    assert spec.C_ABS_MAX == spec.SPEC["coefficients"]["c_abs_max"] == 1e30


def test_load_and_read_refuse_a_signed_file_with_c_out_of_bounds(tmp_path):
    base, model = injected()
    loldu.save_adapter(model, tmp_path)

    def blow_up(t):
        r = t["z"].numel() // t["sigma"].numel()  # one rank: layer 1's z is z[r:2r] (format 4)
        t["z"][r:2 * r].fill_(HUGE)
        t["sigma"][1] = HUGE

    resign(tmp_path, blow_up)
    layer = json.loads((tmp_path / CONFIG_NAME).read_text())["layers"][1]["name"]
    for call in (lambda: read_adapter(tmp_path), lambda: loldu.load_adapter(copy.deepcopy(base), tmp_path)):
        with pytest.raises(AdapterError, match=re.escape(str(tmp_path / WEIGHTS_NAME)) + f".*layer '{layer}'"):
            call()
    assert_one_line_error(cli("inspect", tmp_path), WEIGHTS_NAME, f"layer '{layer}'", "out of bounds")


def test_merge_refuses_c_out_of_bounds_and_an_overflowing_merged_weight():
    _, model = injected()
    with torch.no_grad():  # finite c = sigma0 (z - D) of about 1e32: beyond the bound, not an fp32 overflow
        model.fc2.loldu_z["default"].add_(1e32 / model.fc2.sigma0["default"])
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"layer 'fc2'.*c\[0\].*exceeds"):
        loldu.merge(model)
    with pytest.raises(AdapterError, match=r"layer 'fc2'.*NaN/Inf coefficients"):
        with torch.no_grad():
            model.fc2.loldu_z["default"].fill_(HUGE)
            model.fc2.loldu_sigma["default"].fill_(HUGE)
        loldu.merge(model)
    # An fp16 base: c of 1e6 is within the bound but W0 + ΔW overflows fp16 (max 65504).
    _, half = injected(dtype=torch.float16)
    with torch.no_grad():
        half.fc2.loldu_z["default"].add_(1e6 / half.fc2.sigma0["default"])
    weights = {n: p.detach().clone() for n, p in half.named_parameters()}
    with pytest.raises(AdapterError, match=r"layer 'fc2'.*merged weight.*NaN/Inf.*float16.*unchanged"):
        loldu.merge(half)
    assert all(torch.equal(p, weights[n]) for n, p in half.named_parameters())  # exactly, the layers before too
    assert all(layer.merged_adapter is None for _, layer in loldu.adapted_layers(half))
    assert before.keys() == model.state_dict().keys()


def test_ort_runner_refuses_non_finite_or_huge_c_feeds(tmp_path):
    pytest.importorskip("onnxruntime")
    import loldu.export as lx

    _, model = injected()
    rep = lx.to_onnx(model, inputs(), tmp_path / "c.onnx", merge=False, adapter_inputs=True, provider="cpu")
    runner = lx.OrtRunner(rep.path, provider="cpu")
    feeds = dict(zip(runner.input_names, inputs()))
    good = lx.adapter_feeds(model, runner)
    runner.run(feeds, adapter=good)
    name = sorted(good)[0]
    for bad in (float("inf"), float("nan"), 1e31):
        c = good[name].copy() if hasattr(good[name], "copy") else good[name].clone()
        c[1] = bad
        with pytest.raises(loldu.ExportError, match=re.escape(name) + ".*finite and at most 1e\\+30"):
            runner.run(feeds, adapter={**good, name: c})


# -- 2. special files and sizes: nothing hangs --------------------------------------------------------
HANG_CHECK = '''
    import copy, os, sys, warnings
    from pathlib import Path
    import torch
    import loldu
    from _model_helpers import TARGETS, TinyNet
    from loldu.adapter_io import read_adapter
    from loldu.cli import main
    d = Path({d!r})
    base = TinyNet()
    if (d.parent / "base.pt").exists():
        base.load_state_dict(torch.load(d.parent / "base.pt"))
    out = []
    for name, call in [("read_adapter", lambda: read_adapter(d)),
                       ("load_adapter", lambda: loldu.load_adapter(base, d)),
                       ("inspect", lambda: main(["inspect", str(d)]))]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                r = call()
                out.append(f"{{name}}: ok {{r if name == 'inspect' else ''}} {{[str(x.message)[:200] for x in w]}}")
            except loldu.AdapterError as e:
                out.append(f"{{name}}: refused {{e}}")
    print("\\n".join(out))
'''


def check_no_hang(d: Path) -> dict:
    r = run_python(HANG_CHECK.format(d=str(d)), timeout=120)  # a hang is a TimeoutExpired, not a stuck suite
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and line.split(":")[0]
                 in ("read_adapter", "load_adapter", "inspect"))
    return {k: (v, r.stderr) for k, v in lines.items()}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_adapter_file_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / WEIGHTS_NAME)
    got = check_no_hang(tmp_path)
    for what in ("read_adapter", "load_adapter"):
        assert got[what][0].startswith("refused") and "FIFO" in got[what][0], got
    assert got["inspect"][0].startswith("ok 1") and "FIFO" in got["inspect"][1], got


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_readable_copy_is_ignored_with_a_warning(tmp_path):
    base, model = injected()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    loldu.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).unlink()
    os.mkfifo(tmp_path / "a" / CONFIG_NAME)
    got = check_no_hang(tmp_path / "a")
    assert got["read_adapter"][0].startswith("ok") and CONFIG_NAME in got["read_adapter"][0], got
    assert got["load_adapter"][0].startswith("ok"), got
    assert got["inspect"][0].startswith("ok 0"), got


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_as_the_format_1_config_is_refused(tmp_path):
    from test_adapter_io import to_format_1

    _, model = injected()
    loldu.save_adapter(model, tmp_path)
    to_format_1(tmp_path)
    (tmp_path / spec.LEGACY_CONFIG_NAME).unlink()
    os.mkfifo(tmp_path / spec.LEGACY_CONFIG_NAME)
    got = check_no_hang(tmp_path)
    assert got["read_adapter"][0].startswith("refused") and "FIFO" in got["read_adapter"][0], got


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_symlink_to_dev_zero_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match=re.escape(str(tmp_path / WEIGHTS_NAME)) + ".*character device"):
        read_adapter(tmp_path)
    assert_one_line_error(cli("inspect", tmp_path), "character device")


def test_a_symlink_to_a_regular_adapter_file_still_loads(tmp_path):
    base, model = injected()
    loldu.save_adapter(model, tmp_path / "real")
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / "real" / WEIGHTS_NAME, tmp_path / "link" / WEIGHTS_NAME)
    with pytest.warns(AdapterWarning):  # no readable copy beside the link
        loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path / "link")
    x = inputs()
    torch.testing.assert_close(loaded(*x), model(*x))


@pytest.mark.parametrize("how", ["sparse", "padded"])
def test_a_sparse_gigabyte_file_is_refused_before_it_is_read(tmp_path, how):
    """12 GiB that take no disk: an all-zero file, and a valid adapter extended to 12 GiB. Either is
    refused from its size and header alone (reading it would take 12 GiB of memory)."""
    path = tmp_path / WEIGHTS_NAME
    if how == "padded":
        _, model = injected()
        loldu.save_adapter(model, tmp_path)
    else:
        path.touch()
    os.truncate(path, 12 << 30)
    word = "corrupted safetensors header" if how == "sparse" else "its safetensors header describes"
    with pytest.raises(AdapterError, match=re.escape(str(path)) + ".*" + word):
        read_adapter(tmp_path)
    assert_one_line_error(cli("inspect", tmp_path), WEIGHTS_NAME)


def test_a_header_claiming_more_data_than_the_file_holds_is_refused(tmp_path):
    _, model = injected()
    loldu.save_adapter(model, tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(raw + b"\0" * 8)  # trailing bytes no tensor owns
    with pytest.raises(AdapterError, match="header describes"):
        read_adapter(tmp_path)


# -- 3. Trainer resume skips an incomplete checkpoint -------------------------------------------------
def test_resume_skips_an_empty_and_a_half_written_newest_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from test_trainer import causal_task, targs, values

    from loldu.errors import LolduWarning
    from loldu.trainer import LoLDUTrainer, last_complete_checkpoint

    make, data = causal_task()
    out = tmp_path / "out"
    model = make()
    LoLDUTrainer(model=model, args=targs(out, max_steps=2, save_steps=2), train_dataset=data).train()
    at_2 = values(model)
    (out / "checkpoint-9").mkdir()  # killed before anything was committed
    half = out / "checkpoint-7"  # killed after the adapter, before Trainer's trainer_state.json
    loldu.save_adapter(model, half)
    if hasattr(os, "mkfifo"):
        (out / "checkpoint-8").mkdir()
        os.mkfifo(out / "checkpoint-8" / WEIGHTS_NAME)
    with pytest.warns(LolduWarning, match=r"checkpoint-2.*checkpoint-9.*checkpoint-7"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")

    resumed = make()
    begin = []

    class Begin(__import__("transformers").TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            begin.append((state.global_step, values(model)))

    trainer = LoLDUTrainer(model=resumed, args=targs(out, max_steps=3, save_steps=100), train_dataset=data,
                           callbacks=[Begin()])
    with pytest.warns(LolduWarning, match="skipped the newer incomplete"):
        trainer.train(resume_from_checkpoint=True)
    step, vals = begin[0]
    assert step == 2 and all(torch.equal(vals[n], at_2[n]) for n in at_2)
    assert trainer.state.global_step == 3


def test_resume_with_only_incomplete_checkpoints_says_so(tmp_path):
    pytest.importorskip("transformers")
    from loldu.trainer import last_complete_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4')  # cut short
    with pytest.raises(AdapterError, match=r"no complete checkpoint.*checkpoint-4 \(trainer_state.json is not "
                                           r"valid JSON\).*checkpoint-3"):
        last_complete_checkpoint(tmp_path)
    assert last_complete_checkpoint(tmp_path / "none") is None


# -- 4. stale factors ---------------------------------------------------------------------------------
def _two_bases():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32)), nn.Sequential(nn.Linear(16, 32))


@pytest.mark.parametrize("edit", ["copy_", "data", "parameter"])
def test_an_in_place_edit_of_the_base_weight_is_refused_at_save_and_merge(tmp_path, edit):
    A, B = _two_bases()
    m = loldu.inject(copy.deepcopy(A), loldu.LoLDUConfig(rank=4, target_modules=["0"]))
    with torch.no_grad():
        m[0].loldu_z["default"].mul_(1.1)
        if edit == "copy_":
            m[0].base_layer.weight.copy_(B[0].weight)
        elif edit == "data":
            m[0].base_layer.weight.data = B[0].weight.data.clone()
        else:
            m[0].base_layer.weight = nn.Parameter(B[0].weight.detach().clone(), requires_grad=False)
    with pytest.raises(AdapterError, match=r"layer '0'.*changed after its frozen factors.*load_state_dict.*re-inject"):
        loldu.save_adapter(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(AdapterError, match=r"layer '0'.*stale"):
        loldu.merge(m)
    # load_state_dict re-derives the factors from the weight the layer now has: then it saves and reloads
    # (onto the model's own base: the edit changed the weight, not the bias).
    m.load_state_dict(m.state_dict())
    loldu.save_adapter(m, tmp_path / "a")
    x = torch.randn(5, 16)
    got = loldu.load_adapter(loldu.unload(copy.deepcopy(m)), tmp_path / "a")(x)
    assert (got - m(x)).abs().max() <= 1e-5 * m(x).abs().max()  # the same factors from the same pivots


def test_casts_and_moves_keep_fresh_factors_fresh_and_stale_ones_stale(tmp_path):
    A, B = _two_bases()
    m = loldu.inject(copy.deepcopy(A), loldu.LoLDUConfig(rank=4, target_modules=["0"]))
    m.double()
    loldu.save_adapter(m, tmp_path / "f64")  # a cast is not an edit
    m.float()
    with torch.no_grad():
        m[0].base_layer.weight.add_(torch.randn_like(m[0].base_layer.weight))
    m.double()
    with pytest.raises(AdapterError, match="stale"):
        loldu.save_adapter(m, tmp_path / "b")
    # What merge writes and unmerge restores exactly leaves the factors fresh.
    m2 = loldu.inject(copy.deepcopy(A), loldu.LoLDUConfig(rank=4, target_modules=["0"]))
    perturb(m2)
    loldu.merge(m2)
    loldu.unmerge(m2)
    loldu.save_adapter(m2, tmp_path / "c")


def test_loading_into_an_injected_model_with_stale_factors_is_refused(tmp_path):
    """A file made for the edited weight (2 W: the same pivots, so the file's fingerprint and pivots
    fit) cannot go onto a layer whose factors are still those of W."""
    A, _ = _two_bases()
    config = loldu.LoLDUConfig(rank=4, target_modules=["0"])
    m = loldu.inject(copy.deepcopy(A), config)
    doubled = copy.deepcopy(A)
    with torch.no_grad():
        doubled[0].weight.mul_(2)
    loldu.save_adapter(loldu.inject(copy.deepcopy(doubled), config), tmp_path)
    with torch.no_grad():
        m[0].base_layer.weight.mul_(2)
        m[0].base_layer.weight.div_(2)  # exactly back: fresh again
    with torch.no_grad():
        m[0].base_layer.weight.mul_(2)
    assert torch.equal(read_adapter(tmp_path).layer(0)["pivots"], m[0].loldu_pivots)
    with pytest.raises(AdapterError, match=r"layer '0'.*stale"):
        loldu.load_adapter(m, tmp_path, adapter_name="b")
    m.load_state_dict(m.state_dict())  # re-derived from 2 W: the file fits now
    loldu.load_adapter(m, tmp_path, adapter_name="b")


# -- 5. fp64 adapters are saved in fp64 ---------------------------------------------------------------
def test_an_fp64_adapter_round_trips_exactly(tmp_path):
    torch.manual_seed(1)
    base = TinyNet().double()
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=3, target_modules=TARGETS))
    loldu.save_adapter(model, tmp_path / "untrained")
    assert read_adapter(tmp_path / "untrained").tensors["z"].dtype == torch.float64
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs())
    loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path / "untrained")
    for a, b in zip(loaded(*x), base(*x)):
        # c == 0 exactly, so only the base products remain; the fused op and nn.Linear may take two GEMM
        # routes (last-bit differences across CPUs), so bounded at fp64 rounding: z saved as fp32 gave 4.8e-9.
        assert float((a - b).abs().max()) <= 1e-13 * max(1.0, float(b.abs().max()))
    perturb(model)
    loldu.save_adapter(model, tmp_path / "trained")
    loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path / "trained")
    for (_, a), (_, b) in zip(loldu.adapted_layers(loaded), loldu.adapted_layers(model)):
        assert torch.equal(a.loldu_z["default"], b.loldu_z["default"])
        assert torch.equal(a.loldu_sigma["default"], b.loldu_sigma["default"])
    assert "float64" in cli("inspect", tmp_path / "trained").stdout


def test_fp32_adapters_stay_fp32_and_mixed_dtypes_in_z_and_sigma_are_refused(tmp_path):
    _, model = injected()
    loldu.save_adapter(model, tmp_path)
    assert read_adapter(tmp_path).tensors["z"].dtype == torch.float32

    def mixed(t):
        t["z"] = t["z"].double()

    resign(tmp_path, mixed)
    with pytest.raises(AdapterError, match="'z', 'sigma' must share one dtype"):
        read_adapter(tmp_path)


# -- 6. float8 weights --------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_a_float8_weight_is_refused_by_name():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    model[1].weight.data = model[1].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(AdapterError, match=r"layer '1'.*float8_e4m3fn.*dequantize"):
        loldu.inject(model, loldu.LoLDUConfig(rank=4, target_modules=["0", "1"]))
    assert not loldu.adapted_layers(model)


# -- 7. over-long names -------------------------------------------------------------------------------
def test_a_name_too_long_is_an_adapter_error_naming_it(tmp_path):
    _, model = injected()
    long = tmp_path / ("x" * 300)
    for call in (lambda: loldu.save_adapter(model, long), lambda: loldu.load_adapter(TinyNet(), long),
                 lambda: read_adapter(long)):
        with pytest.raises(AdapterError, match="x" * 300 + ".*(File name too long|no such adapter)"):
            call()


@pytest.mark.parametrize("length", [233, 234, 245, 250, 255])
def test_temporaries_of_a_long_target_name_fit_name_max(tmp_path, length):
    target = tmp_path / ("é" + "y" * (length - 2))  # one 2-byte character: names are cut in bytes
    assert len(os.fsencode(target.name)) == length
    with atomic.atomic_write([target]) as w:
        tmp = Path(w.temps[0])
        assert len(os.fsencode(tmp.name)) <= 255
        assert atomic._temp_patterns(target)[0].fullmatch(tmp.name)
        w.write(0, b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == [target.name]
    # A killed writer's temporary (no lock held, its pid gone) is recognised and removed.
    stale = tmp_path / f".{os.fsdecode(os.fsencode(target.name)[:atomic.TEMP_NAME_BYTES])}.1234567-abcdefgh.tmp"
    stale.write_bytes(b"partial")
    assert atomic.clean_stale_temps(target) == [str(stale)]


def test_to_onnx_writes_a_250_byte_name(tmp_path):
    pytest.importorskip("onnxruntime")
    import loldu.export as lx

    _, model = injected()
    out = tmp_path / ("m" * 245 + ".onnx")
    rep = lx.to_onnx(model, inputs(), out, provider="cpu")
    assert Path(rep.path).is_file() and sorted(os.listdir(tmp_path)) == [out.name]
    with pytest.raises(loldu.ExportError, match="x" * 300 + ".*File name too long"):
        lx.to_onnx(model, inputs(), tmp_path / ("x" * 300 + ".onnx"), provider="cpu")
    assert_one_line_error(cli("inspect", tmp_path / ("x" * 300)), "File name too long")


# -- 8. adapter_ids and seq-first models --------------------------------------------------------------
class SeqFirst(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_adapter_ids_refuses_a_model_with_batch_first_false(batch_first):
    model = loldu.inject(SeqFirst(batch_first), loldu.LoLDUConfig(rank=2, target_modules=["fc"]), "a")
    loldu.add_adapter(model, "b")
    perturb(model, "b")
    x = torch.randn(3, 3, 8)  # seq == batch: no row count could tell them apart
    if not batch_first:
        with pytest.raises(AdapterError, match=r"module 'attn' \(MultiheadAttention\) has batch_first=False"):
            with loldu.adapter_ids(model, ["a", "b", None]):
                pass
        return
    with loldu.adapter_ids(model, ["a", "b", None]):
        mixed = model(x)
    loldu.set_adapter(model, "b")
    assert torch.allclose(mixed[1], model(x)[1])


# -- 9. messages --------------------------------------------------------------------------------------
def test_a_peft_wrapped_layer_is_named_as_such():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterError, match=r"layer 'base_model.model.0' is wrapped by PEFT \(peft\.tuners\.lora\.layer"
                                           r"\.Linear around Linear\).*merge_and_unload"):
        loldu.inject(pm, loldu.LoLDUConfig(rank=2, target_modules=["0"]))


def test_adapter_names_follow_the_spec_pattern():
    from loldu import model as lm

    assert lm._NAME_RE.pattern == spec.SPEC["adapter_name"]["pattern"]
    m = loldu.inject(nn.Sequential(nn.Linear(8, 8)), loldu.LoLDUConfig(rank=2, target_modules=["0"]))
    for good in ("_x-1", "B2"):
        loldu.add_adapter(m, good)
    for bad in ("1a", "-a", "a b", "é", "a.b", ""):
        with pytest.raises(AdapterError, match="adapter name"):
            loldu.add_adapter(m, bad)


def test_moving_the_model_keeps_the_check_and_merge_finite_check_on_the_device(tmp_path, device):
    A, _ = _two_bases()
    m = loldu.inject(copy.deepcopy(A), loldu.LoLDUConfig(rank=4, target_modules=["0"])).to(device)
    perturb(m)
    loldu.save_adapter(m, tmp_path / "a")  # a move is not an edit
    loldu.merge(m)
    loldu.unmerge(m)
    with torch.no_grad():
        m[0].base_layer.weight[:, 0] += 1.0
    m.cpu()  # moved while stale: still stale
    with pytest.raises(AdapterError, match=r"layer '0'.*stale"):
        loldu.save_adapter(m, tmp_path / "b")


# -- The header is checked whole, against the spec, before any tensor data is read ----------------------
def _set(path: tuple, value):
    def edit(header):
        *where, last = path
        target = header
        for key in where:
            target = target[key]
        target[last] = value
    return edit


@pytest.mark.parametrize("path, value, words", [
    (("adapter_name",), "1bad", ["adapter_name '1bad'", spec.ADAPTER_NAME_PATTERN]),
    (("adapter_name",), "a/b", ["adapter_name 'a/b'"]),
    (("adapter_name",), 5, ["adapter_name 5"]),
    (("layers", 1, "kind"), "bogus", ["kind 'bogus' is not one of linear"]),
    (("layers", 1, "dtype"), "float99", ["dtype 'float99' is not one of float32"]),
    (("layers", 1, "dtype"), "float8_e4m3fn", ["dtype 'float8_e4m3fn'"]),
    (("layers", 1, "shape"), [32, True], ["'layers' must be", "positive ints"]),
])
def test_read_refuses_header_fields_the_spec_forbids(tmp_path, path, value, words):
    """A later load would refuse each, or worse; read_adapter (and `loldu inspect`) refuse them first."""
    _, model = injected()
    loldu.save_adapter(model, tmp_path)
    layer = json.loads((tmp_path / CONFIG_NAME).read_text())["layers"][1]["name"]
    resign(tmp_path, lambda t: None, _set(path, value))
    with pytest.raises(AdapterError) as e:
        read_adapter(tmp_path)
    assert str(e.value).startswith(str(tmp_path / WEIGHTS_NAME) + ": ")
    for w in words + ([f"layer '{layer}'"] if path[-1] in ("kind", "dtype") else []):
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("where", ["layer", "saved tensor", "metadata"])
def test_a_lone_surrogate_is_refused_with_a_printable_message(tmp_path, where):
    """JSON's "\\ud800" escape is no character: Python's json takes it, UTF-8 cannot hold it."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=2, target_modules=["0"], modules_to_save=["1"]))
    perturb(model)
    loldu.save_adapter(model, tmp_path)
    if where == "layer":
        resign(tmp_path, lambda t: None, _set(("layers", 0, "name"), "\ud800x"))
    elif where == "saved tensor":
        resign(tmp_path, lambda t: None, _set(("saved_modules", 0, "tensors", 1), "\ud800"))
    else:  # the safetensors header's own JSON
        raw = (tmp_path / WEIGHTS_NAME).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8:8 + n])
        head["__metadata__"]["note"] = "\udc00"
        text = json.dumps(head).encode()  # ASCII: the escape stays an escape
        text += b" " * (-len(text) % 8)
        (tmp_path / WEIGHTS_NAME).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(AdapterError, match="not valid Unicode") as e:
        read_adapter(tmp_path)
    assert str(e.value).startswith(str(tmp_path / WEIGHTS_NAME))
    str(e.value).encode("utf-8")  # printable: no surrogate in the message
    with pytest.raises(AdapterError, match="not valid Unicode"):
        loldu.load_adapter(copy.deepcopy(base), tmp_path)
    assert_one_line_error(cli("inspect", tmp_path), WEIGHTS_NAME, "not valid Unicode")


def sparse_wrong_table(d: Path) -> Path:
    """A valid adapter's header (its config and hashes intact) over a tensor table that is not the
    spec's: one tensor z of (1, 2**30) F32, its 4 GiB of data a hole (truncate: no disk used)."""
    _, model = injected()
    loldu.save_adapter(model, d)
    path = d / WEIGHTS_NAME
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    text = json.dumps({"__metadata__": meta, "z": {"dtype": "F32", "shape": [1, 2**30],
                                                   "data_offsets": [0, 2**32]}}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    os.truncate(path, 8 + len(text) + 2**32)
    return path


def test_a_sparse_file_with_a_wrong_tensor_table_is_refused_before_its_data_is_read(tmp_path):
    """Its size matches its header, so only the tensor table can refuse it: from the header, not
    after reading 4 GiB (a subprocess with a timeout far below what reading them takes)."""
    path = sparse_wrong_table(tmp_path)
    r = run_python(f"""
        import sys
        from loldu.adapter_io import read_adapter
        from loldu.errors import AdapterError
        try:
            read_adapter({str(tmp_path)!r})
        except AdapterError as e:
            print(e)
            sys.exit(3)
        """, timeout=20)
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith(str(path)) and "expected tensors" in r.stdout and "found ['z']" in r.stdout, r.stdout


@pytest.mark.parametrize("storage", ["full", "cur", "lu"])
def test_refused_load_state_dict_leaves_every_module_as_it_was(storage):
    """torch loads module by module: the adapted model's pre-hook checks every LoLDU layer first, so a
    refused layer leaves also the plain modules loaded before it unchanged."""
    def net():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    a, b = net(), net()
    model = loldu.inject(copy.deepcopy(a), loldu.LoLDUConfig(rank=8, target_modules=["2"], factor_storage=storage))
    other = loldu.inject(copy.deepcopy(b), loldu.LoLDUConfig(rank=8, target_modules=["2"], factor_storage="lu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(loldu.AdapterError, match="nothing was loaded"):
        model.load_state_dict(other.state_dict())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_lu_refuses_a_weight_shared_with_another_module():
    """Tied weights: the LU would replace the other module's weight too; refused by name, model unchanged."""
    net = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    net[2].weight = net[0].weight  # tied
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(loldu.AdapterError, match=r"layer '0': its weight is shared with \['2'\]"):
        loldu.inject(net, loldu.LoLDUConfig(rank=12, target_modules=["0"], factor_storage="lu"))
    assert isinstance(net[0], nn.Linear) and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    loldu.inject(net, loldu.LoLDUConfig(rank=12, target_modules=["0"]))  # the default store keeps W0: fine


def test_a_directory_without_an_adapter_file_says_what_it_holds(tmp_path):
    """The plain Trainer's output (a whole model), Trainer checkpoints, or whatever else is there."""
    model = loldu.inject(nn.Sequential(nn.Linear(8, 8)), loldu.LoLDUConfig(rank=2, target_modules=["0"]))
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "model.safetensors").write_bytes(b"x")
    with pytest.raises(loldu.AdapterError, match="holds a whole model .*LoLDUTrainer"):
        loldu.load_adapter(model, whole)
    runs = tmp_path / "runs"
    (runs / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(loldu.AdapterError, match="Trainer checkpoints: pass one of them.*checkpoint-2"):
        loldu.load_adapter(model, runs)
    with pytest.raises(loldu.AdapterError, match="the directory is empty"):
        loldu.load_adapter(model, (tmp_path / "empty").mkdir() or tmp_path / "empty")
