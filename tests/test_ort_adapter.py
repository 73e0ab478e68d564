"""Serving many adapters from one ONNX file with ONNX Runtime's adapter API: c inputs with default
zeros, .onnx_adapter files (loldu.export.to_ort_adapter), per-run switching in OrtRunner, and the
full-rank serving graph without W0 (lu_graph=True)."""
import copy
import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, c64, inputs, oracle_forward, perturb

import loldu

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
lx = pytest.importorskip("loldu.export")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_adapted(seed, adapters=("a", "b")):
    torch.manual_seed(seed)
    base = TinyNet().eval()
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=4, target_modules=TARGETS), adapters[0])
    for name in adapters[1:]:
        loldu.add_adapter(model, name)
    for name in adapters:
        perturb(model, name)
    return base, model.eval()


def export_and_save(model, d, adapters=("a", "b")):
    rep = lx.to_onnx(model, inputs(), d / "c.onnx", merge=False, adapter_inputs=True)
    for name in adapters:
        loldu.save_adapter(model, d / f"ad_{name}", name)
        lx.to_ort_adapter(d / f"ad_{name}", rep.path, d / f"{name}.onnx_adapter")
    return rep


def run_tiny(runner, ids, img, adapter=None):
    out = runner.run({"input_0": ids, "input_1": img}, adapter=adapter)
    return [np.asarray(v, dtype=np.float64) for v in out.values()]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_no_active_adapter_gives_the_base_outputs(tmp_path):
    base, model = tiny_adapted(seed=0)
    rep = export_and_save(model, tmp_path)
    proto = onnx.load(rep.path)
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in rep.adapter_inputs}
    # Named by layer, one default of zeros per layer, (r,) fp32.
    assert sorted(defaults) == sorted(lx.C_PREFIX + n for n in TARGETS)
    assert all(v.shape == (4,) and v.dtype == np.float32 and not v.any() for v in defaults.values())
    meta = {e.key: e.value for e in proto.metadata_props}
    runner = lx.OrtRunner(rep.path, provider="cpu")
    assert meta["loldu.model_version"] == str(runner.model_version())
    assert all(runner.c_inputs[n] == (np.float32, (4,), True) for n in defaults)  # optional, (r,) fp32
    for b, s in [(1, 3), (6, 7)]:
        ids, img = inputs(batch=b, seq=s)
        with torch.no_grad():
            ref = [t.double().numpy() for t in base(ids, img)]
        got = run_tiny(runner, ids, img)
        # c = 0: the base computation plus a zero low-rank branch (fp32 rounding of other GEMM routes)
        assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-5
        with_a = run_tiny(runner, ids, img, adapter=tmp_path / "a.onnx_adapter")
        assert max(np.abs(g - r).max() for g, r in zip(with_a, ref)) > 1e-2  # the adapter matters


def test_two_onnx_adapters_applied_per_run_match_pytorch(tmp_path):
    _, model = tiny_adapted(seed=1)
    rep = export_and_save(model, tmp_path)
    runner = lx.OrtRunner(rep.path, provider="cpu")
    for name in ("a", "b"):  # the file holds each layer's c, in the graph's dtype, and the model's version
        fmt = ort.AdapterFormat.read_adapter(str(tmp_path / f"{name}.onnx_adapter"))
        assert fmt.get_model_version() == runner.model_version()
        params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
        feeds = lx.adapter_feeds(tmp_path / f"ad_{name}", rep.path)
        assert params.keys() == feeds.keys()
        assert all(params[k].dtype == np.float32 and np.array_equal(params[k], feeds[k].numpy()) for k in params)
    outs = {}
    for step in range(6):  # switching adapter every run, fresh inputs and shapes each time
        name = "ab"[step % 2]
        ids, img = inputs(batch=1 + step, seq=2 + step)
        got = run_tiny(runner, ids, img, adapter=tmp_path / f"{name}.onnx_adapter")
        ref = [t.numpy() for t in lx.pytorch_outputs(model, (ids, img), name)]
        with torch.no_grad():
            oracle = [t.numpy() for t in oracle_forward(model, ids, img, name)]
        assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-4
        assert max(np.abs(g - r).max() for g, r in zip(got, oracle)) <= 1e-4
        outs[name] = got
    ids, img = inputs(batch=3, seq=4)
    ya, yb = (run_tiny(runner, ids, img, adapter=tmp_path / f"{n}.onnx_adapter")[0] for n in "ab")
    assert np.abs(ya - yb).max() > 1e-2
    assert runner.adapter_loads == 2


def test_wrong_base_and_wrong_model_are_refused_and_files_untouched(tmp_path):
    _, model = tiny_adapted(seed=2)
    rep = export_and_save(model, tmp_path)
    _, other = tiny_adapted(seed=3)  # same architecture and rank, other base weights
    loldu.save_adapter(other, tmp_path / "foreign", "a")
    out = tmp_path / "a.onnx_adapter"
    before = {p: sha(p) for p in (out, rep.path)}
    with pytest.raises(loldu.ExportError, match="foreign.*c.onnx.*different base weight"):
        lx.to_ort_adapter(tmp_path / "foreign", rep.path, out)
    fresh = tmp_path / "new.onnx_adapter"
    with pytest.raises(loldu.ExportError, match="different base weight"):
        lx.to_ort_adapter(tmp_path / "foreign", rep.path, fresh)
    assert not fresh.exists() and {p: sha(p) for p in before} == before
    merged = lx.to_onnx(model, inputs(), tmp_path / "m.onnx")  # no c inputs
    with pytest.raises(loldu.ExportError, match="ad_a.*m.onnx.*no c inputs"):
        lx.to_ort_adapter(tmp_path / "ad_a", merged.path, out)
    with pytest.raises(loldu.ExportError, match="must end in .onnx_adapter"):
        lx.to_ort_adapter(tmp_path / "ad_a", rep.path, tmp_path / "x.bin")
    assert sha(out) == before[out]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tmp")) == []
    # An .onnx_adapter made for this base, run on another base's export of the same architecture.
    other_rep = lx.to_onnx(other, inputs(), tmp_path / "other.onnx", merge=False, adapter_inputs=True)
    runner = lx.OrtRunner(other_rep.path, provider="cpu")
    with pytest.raises(loldu.ExportError, match="a.onnx_adapter.*other.onnx.*another base model"):
        runner.run(inputs(), adapter=out)
    with pytest.raises(loldu.ExportError, match="ad_a.*other.onnx.*different base weight"):
        runner.run(inputs(), adapter=tmp_path / "ad_a")
    junk = tmp_path / "junk.onnx_adapter"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(loldu.ExportError, match="junk.onnx_adapter.*not an ONNX Runtime adapter file"):
        runner.run(inputs(), adapter=junk)
    with pytest.raises(loldu.ExportError, match="no such adapter directory or .onnx_adapter file"):
        runner.run(inputs(), adapter=tmp_path / "nowhere")
    assert sha(out) == before[out] and runner.cached_adapters == 0


@pytest.mark.parametrize("value", [float("nan"), "bitflip"])
def test_altered_onnx_adapter_values_are_refused(tmp_path, value):
    """A c value changed inside an .onnx_adapter (NaN, or one flipped bit) no longer matches the file's
    adapter version: refused naming both files, never run."""
    import onnxruntime as ort

    _, model = tiny_adapted(seed=4)
    rep = export_and_save(model, tmp_path, adapters=("a",))
    path = tmp_path / "a.onnx_adapter"
    c = next(iter(ort.AdapterFormat.read_adapter(str(path)).get_parameters().values())).numpy()
    raw = bytearray(path.read_bytes())
    at = raw.find(c.tobytes()[:8])
    assert at >= 0
    if value == "bitflip":
        raw[at] ^= 1
    else:
        raw[at:at + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(raw))
    runner = lx.OrtRunner(rep.path, provider="cpu")
    with pytest.raises(loldu.ExportError, match="a.onnx_adapter.*c.onnx.*altered"):
        runner.run(inputs(), adapter=path)
    assert runner.cached_adapters == 0


def test_model_exported_without_c_defaults(tmp_path):
    """An export whose c inputs have no default (an older loldu): no .onnx_adapter for it, and an
    adapter directory is still fed as inputs."""
    _, model = tiny_adapted(seed=4)
    rep = export_and_save(model, tmp_path)
    proto = onnx.load(rep.path)
    keep = [t for t in proto.graph.initializer if not t.name.startswith(lx.C_PREFIX)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(loldu.ExportError, match="no default value"):
        lx.to_ort_adapter(tmp_path / "ad_a", old, tmp_path / "x.onnx_adapter")
    runner = lx.OrtRunner(old, provider="cpu")
    ids, img = inputs(batch=2, seq=3)
    got = run_tiny(runner, ids, img, adapter=tmp_path / "ad_a")
    ref = [t.numpy() for t in lx.pytorch_outputs(model, (ids, img), "a")]
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-4
    with pytest.raises(loldu.ExportError, match="missing inputs"):
        runner.run({"input_0": ids, "input_1": img})
    with pytest.raises(loldu.ExportError, match="a.onnx_adapter.*old.onnx.*no default values"):
        runner.run({"input_0": ids, "input_1": img}, adapter=tmp_path / "a.onnx_adapter")


def test_runner_caches_and_switches(tmp_path):
    _, model = tiny_adapted(seed=5, adapters=("a", "b", "c"))
    rep = export_and_save(model, tmp_path, adapters=("a", "b", "c"))
    runner = lx.OrtRunner(rep.path, provider="cpu")
    ids, img = inputs(batch=2, seq=5)
    expect = {n: [t.numpy() for t in lx.pytorch_outputs(model, (ids, img), n)] for n in "abc"}
    order = ["a.onnx_adapter", "ad_b", "c.onnx_adapter", "ad_a", "a.onnx_adapter", "ad_b", "c.onnx_adapter"] * 2
    for item in order:  # files and directories, each loaded once
        got = run_tiny(runner, ids, img, adapter=tmp_path / item)
        name = item[3] if item.startswith("ad_") else item[0]
        assert max(np.abs(g - r).max() for g, r in zip(got, expect[name])) <= 1e-4
    assert runner.adapter_loads == 4 and runner.cached_adapters == 4
    # A rewritten file is read again.
    lx.to_ort_adapter(tmp_path / "ad_b", rep.path, tmp_path / "a.onnx_adapter")
    os.utime(tmp_path / "a.onnx_adapter", ns=(1, 1))
    got = run_tiny(runner, ids, img, adapter=tmp_path / "a.onnx_adapter")
    assert max(np.abs(g - r).max() for g, r in zip(got, expect["b"])) <= 1e-4
    assert runner.adapter_loads == 5
    # One at a time: the least recently used is dropped and loaded again when asked for.
    small = lx.OrtRunner(rep.path, provider="cpu", max_adapters=1)
    for item in ["c.onnx_adapter", "ad_a", "c.onnx_adapter"]:
        run_tiny(small, ids, img, adapter=tmp_path / item)
    assert small.adapter_loads == 3 and small.cached_adapters == 1
    with pytest.raises(loldu.ExportError, match="adapter .* and c feeds"):
        runner.run({"input_0": ids, "input_1": img, **lx.adapter_feeds(model)}, adapter=tmp_path / "ad_a")
    # c fed by hand still works (and wins over the default).
    fed = run_tiny(runner, ids, img, adapter=lx.adapter_feeds(tmp_path / "ad_c", runner))
    assert max(np.abs(g - r).max() for g, r in zip(fed, expect["c"])) <= 1e-4


# -- the full-rank serving graph ------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.proj = Conv1D(12, 20)  # transformers: weight (in, out) = (20, 12)
        nn.init.normal_(self.proj.weight, std=0.3)

    def forward(self, x):
        return self.proj(torch.tanh(self.fc1(x)))


def full_rank(storage, seed=6, adapters=("a", "b")):
    torch.manual_seed(seed)
    base = Mlp().eval()
    # rank 12 = min(d, k) of both layers: full rank
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=12, target_modules=["fc1", "proj"],
                                                                factor_storage=storage), adapters[0])
    for name in adapters[1:]:
        loldu.add_adapter(model, name)
    for name in adapters:
        perturb(model, name)
    return base, model.eval()


@torch.no_grad()
def oracle_mlp(base, model, x, name):
    """float64, from the base model's own weights: W0 + PL diag(c) U with c = sigma z - sigma0 D."""
    layers = dict(loldu.adapted_layers(model))
    Ws = {}
    for n, layer in layers.items():
        PL, U = (t.double() for t in layer.store.full_factors(layer))
        Ws[n] = PL @ torch.diag(c64(layer, name)) @ U
    x = x.double()
    h = torch.tanh(x @ (base.fc1.weight.double() + Ws["fc1"]).T + base.fc1.bias.double())
    return (h @ (base.proj.weight.double().T + Ws["proj"]).T + base.proj.bias.double()).numpy()


@pytest.mark.parametrize("storage", ["lu", "full"])
def test_full_rank_lu_graph_matches(tmp_path, storage):
    base, model = full_rank(storage)
    rep = lx.to_onnx(model, torch.randn(3, 12), tmp_path / "lu.onnx", merge=False, adapter_inputs=True, lu_graph=True,
                     check_inputs=torch.randn(5, 12))
    delta = lx.to_onnx(model, torch.randn(3, 12), tmp_path / "delta.onnx", merge=False, adapter_inputs=True)
    assert rep.max_abs_diff <= lx.FP32_BOUND
    # Two MatMuls per layer against three, and no W0: the (d, k) initializers are U^T and PL^T only.
    assert rep.op_counts["MatMul"] == 4 and delta.op_counts["MatMul"] == 6 and "Transpose" not in rep.op_counts
    mats = [onnx.numpy_helper.to_array(t) for t in onnx.load(rep.path).graph.initializer if len(t.dims) == 2]
    assert sum(m.size for m in mats) == 2 * (12 * 12 + 12 * 20)  # per layer U^T (k, m) and PL^T (m, d)
    for w in (base.fc1.weight, base.proj.weight):
        w = w.detach().numpy()
        assert not any(m.shape == v.shape and np.abs(m - v).max() < 1e-3 for m in mats for v in (w, w.T))
    for name in ("a", "b"):
        loldu.save_adapter(model, tmp_path / f"ad_{name}", name)
        lx.to_ort_adapter(tmp_path / f"ad_{name}", rep.path, tmp_path / f"{name}.onnx_adapter")
    runner = lx.OrtRunner(rep.path, provider="cpu")
    for step in range(4):
        name = "ab"[step % 2]
        x = torch.randn(2 + 3 * step, 12)
        y = runner.run({"input": x}, adapter=tmp_path / f"{name}.onnx_adapter")["output"]
        ref = lx.pytorch_outputs(model, x, name)[0].numpy()
        assert np.abs(y - ref).max() <= 1e-4
        assert np.abs(y - oracle_mlp(base, model, x, name)).max() <= 1e-4
    x = torch.randn(4, 12)
    with torch.no_grad():
        y0 = base(x).numpy()
    # c = 0: W0 within the LU's rounding (docs/storage.md), not bit for bit.
    assert np.abs(runner.run({"input": x})["output"] - y0).max() <= 1e-5 * max(1.0, float(np.abs(y0).max())) * 10


def test_lu_graph_refusals(tmp_path):
    torch.manual_seed(7)
    low = loldu.inject(Mlp(), loldu.LoLDUConfig(rank=3, target_modules=["fc1", "proj"])).eval()
    with pytest.raises(loldu.ExportError, match="layer 'fc1'.*rank 3.*full rank"):
        lx.to_onnx(low, torch.randn(3, 12), tmp_path / "x.onnx", merge=False, adapter_inputs=True, lu_graph=True)
    with pytest.raises(loldu.ExportError, match="lu_graph=True needs merge=False"):
        lx.to_onnx(low, torch.randn(3, 12), tmp_path / "x.onnx", lu_graph=True)
    _, tiny = tiny_adapted(seed=8)
    with pytest.raises(loldu.ExportError, match="nn.Embedding"):
        lx.to_onnx(tiny, inputs(), tmp_path / "x.onnx", merge=False, lu_graph=True)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_writes_an_ort_adapter(tmp_path, monkeypatch, capsys):
    from loldu.cli import main

    (tmp_path / "loldu_serve_testmod.py").write_text(
        "import torch\nimport torch.nn as nn\n\n"
        "def tiny():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))\n\n"
        "def example_inputs():\n    return torch.randn(4, 12)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import loldu_serve_testmod as mod

    model = loldu.inject(mod.tiny(), loldu.LoLDUConfig(rank=3, target_modules=["0", "2"]))
    perturb(model)
    loldu.save_adapter(model, tmp_path / "ad")
    out, adapter = tmp_path / "m.onnx", tmp_path / "ad.onnx_adapter"
    args = ["export", "--base", "loldu_serve_testmod:tiny", "--adapter", str(tmp_path / "ad"), "--out", str(out)]
    assert main(args + ["--ort-adapter", str(tmp_path / "ad.bin")]) == 1
    assert "--ort-adapter" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--ort-adapter", str(adapter)]) == 0
    assert f"wrote {adapter}" in capsys.readouterr().out
    x = torch.randn(5, 12)
    y = lx.OrtRunner(out, provider="cpu").run({"input": x}, adapter=adapter)["output"]
    with torch.no_grad():
        assert np.abs(y - model.eval()(x).numpy()).max() <= 1e-4
