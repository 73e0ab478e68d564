"""loldu.export on a small model with every layer kind: merged, unmerged, c as inputs, fp16, errors."""
import copy
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from _model_helpers import TARGETS, TinyNet, inputs, perturb

import loldu

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
lx = pytest.importorskip("loldu.export")

SHAPES = [(1, 3), (7, 11), (2, 5)]  # (batch, sequence) of fresh inputs; the export traced (4, 5)


def adapted(seed=0, rank=4, adapters=("default",)):
    torch.manual_seed(seed)
    base = TinyNet().eval()
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=rank, target_modules=TARGETS), adapters[0])
    for name in adapters[1:]:
        loldu.add_adapter(model, name)
    for name in adapters:
        perturb(model, name)
    return base, model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def ort_vs_torch(runner, model, batch, seq, adapter=None, half=False):
    ids, img = inputs(batch=batch, seq=seq)
    feeds = {"input_0": ids, "input_1": img.half() if half else img}
    out = runner.run(feeds, adapter=adapter)
    ref = lx.pytorch_outputs(model, (ids, img))
    diffs = [float(np.abs(np.asarray(o, dtype=np.float32) - r.numpy()).max()) for o, r in zip(out.values(), ref)]
    for o, r in zip(out.values(), ref):
        assert tuple(o.shape) == tuple(r.shape)
    return max(diffs), ref


def no_temp_files(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_merged_export_is_the_base_graph_and_matches_pytorch(tmp_path):
    base, model = adapted()
    model.train()  # the exporter must not leave the caller's model in another mode
    before = snapshot(model)
    rep = lx.to_onnx(model, inputs(), tmp_path / "merged.onnx", check_inputs=inputs(batch=3, seq=8))
    rep_base = lx.to_onnx(base, inputs(), tmp_path / "base.onnx")
    assert rep.merged == "default" and rep.adapter_inputs == []
    assert rep.op_counts == rep_base.op_counts  # merged: no adapter operation left
    assert all("::" not in op for op in rep.op_counts)  # default ONNX domain only
    assert rep.max_abs_diff is not None and rep.max_abs_diff <= lx.FP32_BOUND
    assert_same_state(model, before)
    assert model.training and len(loldu.adapted_layers(model)) == len(TARGETS)
    assert loldu.adapted_layers(model)[0][1].merged_adapter is None
    runner = lx.OrtRunner(tmp_path / "merged.onnx", provider="cpu")
    model.eval()
    for b, s in SHAPES:  # dynamic batch and sequence axes, fresh random inputs
        diff, ref = ort_vs_torch(runner, model, b, s)
        print(f"merged fp32 batch={b} seq={s}: max |ORT - PyTorch| = {diff:.3g}")
        assert diff <= 1e-4
    # The adapter matters: the base export gives different outputs on the same inputs.
    ids, img = inputs(batch=2, seq=4)
    base_out = lx.OrtRunner(tmp_path / "base.onnx", provider="cpu").run((ids, img))["output_0"]
    assert np.abs(runner.run((ids, img))["output_0"] - base_out).max() > 1e-2


def test_unmerged_export_bakes_c_and_matches(tmp_path):
    _, model = adapted(seed=1)
    rep = lx.to_onnx(model, inputs(), tmp_path / "u.onnx", merge=False)
    assert rep.merged is None and rep.op_counts.get("MatMul", 0) > 2
    runner = lx.OrtRunner(rep.path, provider="cpu")
    for b, s in SHAPES:
        diff, _ = ort_vs_torch(runner, model, b, s)
        assert diff <= 1e-4


def test_adapter_inputs_serve_two_adapters(tmp_path):
    base, model = adapted(seed=2, adapters=("a", "b"))
    before = snapshot(model)
    rep = lx.to_onnx(model, inputs(), tmp_path / "c.onnx", merge=False, adapter_inputs=True)
    assert sorted(rep.adapter_inputs) == sorted(lx.C_PREFIX + n for n in TARGETS)
    assert_same_state(model, before)
    runner = lx.OrtRunner(rep.path, provider="cpu")
    for n in TARGETS:
        meta = runner.inputs[lx.C_PREFIX + n]
        assert meta.type == "tensor(float)" and meta.shape == [4]
    loldu.save_adapter(model, tmp_path / "ad_a", "a")
    loldu.save_adapter(model, tmp_path / "ad_b", "b")
    outs, fixed = {}, inputs(batch=2, seq=6)
    for name in ("a", "b"):
        loldu.set_adapter(model, name)
        from_model = lx.adapter_feeds(model, rep.path)
        from_dir = lx.adapter_feeds(tmp_path / f"ad_{name}", runner)
        assert from_model.keys() == from_dir.keys()
        for k in from_model:  # the file route computes c exactly as the layers do
            assert torch.equal(from_model[k], from_dir[k]), k
        for b, s in SHAPES:
            diff, _ = ort_vs_torch(runner, model, b, s, adapter=tmp_path / f"ad_{name}")
            print(f"adapter {name} batch={b} seq={s}: max |ORT - PyTorch| = {diff:.3g}")
            assert diff <= 1e-4
        outs[name] = runner.run(fixed, adapter=from_model)["output_0"]
    # Same file, same inputs, other c: other outputs.
    assert np.abs(outs["a"] - outs["b"]).max() > 1e-2
    # c == 0 is the base model.
    zeros = {k: torch.zeros_like(v) for k, v in lx.adapter_feeds(model).items()}
    ids, img = inputs(batch=3, seq=4)
    with torch.no_grad():
        ref = base(ids, img)[0]
    assert np.abs(runner.run((ids, img), adapter=zeros)["output_0"] - ref.numpy()).max() <= 1e-4


def test_adapter_inputs_refuse_a_foreign_adapter(tmp_path):
    _, model = adapted(seed=3)
    rep = lx.to_onnx(model, inputs(), tmp_path / "c.onnx", merge=False, adapter_inputs=True)
    _, other = adapted(seed=4)  # same architecture and rank, other base weights
    loldu.save_adapter(other, tmp_path / "foreign")
    with pytest.raises(loldu.ExportError, match="different base weight"):
        lx.adapter_feeds(tmp_path / "foreign", rep.path)
    with pytest.raises(loldu.ExportError, match="the model's adapter: layer .* different base weight"):
        lx.adapter_feeds(other, rep.path)  # same layer names, other base: the model route checks it too
    runner = lx.OrtRunner(rep.path, provider="cpu")
    runner.run(inputs())  # c inputs default to zeros: the base model (tests/test_ort_adapter.py)
    merged = lx.to_onnx(model, inputs(), tmp_path / "m.onnx")
    with pytest.raises(loldu.ExportError, match="not exported with adapter_inputs"):
        lx.adapter_feeds(model, merged.path)


def test_fp16_export_within_documented_bound(tmp_path):
    _, model = adapted(seed=6)
    rep = lx.to_onnx(model, inputs(), tmp_path / "h.onnx", dtype="fp16", check_inputs=inputs(batch=5, seq=9))
    assert rep.dtype == "fp16" and rep.max_abs_diff <= rep.parity_bound
    runner = lx.OrtRunner(rep.path, provider="cpu")
    assert runner.inputs["input_1"].type == "tensor(float16)"
    for b, s in SHAPES:
        diff, ref = ort_vs_torch(runner, model, b, s, half=True)
        bound = lx.parity_bound("fp16", ref)
        print(f"fp16 batch={b} seq={s}: max |ORT - PyTorch fp32| = {diff:.3g} (bound {bound:.3g})")
        assert diff <= bound
    crep = lx.to_onnx(model, inputs(), tmp_path / "hc.onnx", dtype="fp16", merge=False, adapter_inputs=True,
                      check_inputs=inputs(batch=2, seq=3))
    assert crep.max_abs_diff <= crep.parity_bound
    assert lx.OrtRunner(crep.path, provider="cpu").inputs[crep.adapter_inputs[0]].type == "tensor(float)"


def test_export_errors_leave_no_file_and_model_unchanged(tmp_path, monkeypatch):
    _, model = adapted(seed=7)
    before = snapshot(model)
    out = tmp_path / "bad.onnx"
    cases = [
        (dict(example_inputs=inputs(), path=out, dtype="bf16"), "dtype"),
        (dict(example_inputs=inputs(), path=out, adapter_inputs=True), "merge=False"),
        (dict(example_inputs=inputs(), path=tmp_path / "missing" / "x.onnx"), "does not exist"),
        (dict(example_inputs=inputs(), path=tmp_path / "x.txt"), r"\.onnx"),
        (dict(example_inputs=(torch.randint(0, 40, (2, 3)),), path=out), "failed on example_inputs"),
        (dict(example_inputs=[1, 2], path=out), "not a tensor"),
        (dict(example_inputs=inputs(), path=out, adapter_name="nope"), "no adapter 'nope'"),
        (dict(example_inputs=inputs(batch=1), path=out), "size 1 on dynamic axis 0.*at least 2"),
    ]
    for kwargs, match in cases:
        with pytest.raises(loldu.ExportError, match=match):
            lx.to_onnx(model, **kwargs)
    # A failed parity check: the export itself succeeds, the file must still not appear.
    monkeypatch.setattr(lx.onnx_export, "FP32_BOUND", -1.0)
    with pytest.raises(loldu.ExportError, match="parity check failed"):
        lx.to_onnx(model, inputs(), out, check_inputs=inputs(batch=2, seq=3))
    assert not out.exists() and not no_temp_files(tmp_path)
    assert_same_state(model, before)
    # merge=False on a merged model is refused; the caller's merge state is kept.
    loldu.merge(model)
    with pytest.raises(loldu.ExportError, match="merged"):
        lx.to_onnx(model, inputs(), out, merge=False)
    assert loldu.adapted_layers(model)[0][1].merged_adapter == "default"
    assert not out.exists() and not no_temp_files(tmp_path)


def test_dynamic_axes_static_and_labelled(tmp_path):
    _, model = adapted(seed=12)

    def dims(rep, which):
        proto = onnx.load(rep.path)
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in getattr(proto.graph, which)}

    static = lx.to_onnx(model, inputs(batch=1, seq=1), tmp_path / "s.onnx", dynamic_axes={}, merge=False)
    assert dims(static, "input") == {"input_0": [1, 1], "input_1": [1, 3, 6, 6]}
    axes = {"input_0": {0: "n", 1: "t"}, "input_1": [0], "output_0": {0: "rows", 2: "width"}}
    rep = lx.to_onnx(model, inputs(), tmp_path / "d.onnx", dynamic_axes=axes, check_inputs=inputs(batch=3, seq=2))
    assert dims(rep, "input")["input_0"] == ["n", "t"] and dims(rep, "input")["input_1"][0] == "input_1_dim0"
    assert dims(rep, "output")["output_0"] == ["rows", "t", 24]  # axis 2 is static: noted, not labelled
    assert rep.notes == ["output 'output_0' axis 2 is static in the exported graph"]


def test_runner_errors_are_export_errors(tmp_path):
    _, model = adapted(seed=8)
    path = lx.to_onnx(model, inputs(), tmp_path / "m.onnx").path
    with pytest.raises(loldu.ExportError, match="no such ONNX file"):
        lx.OrtRunner(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(loldu.ExportError, match="could not load"):
        lx.OrtRunner(tmp_path / "junk.onnx", provider="cpu")
    with pytest.raises(loldu.ExportError, match="provider must be"):
        lx.OrtRunner(path, provider="tpu")
    runner = lx.OrtRunner(path, provider="cpu")
    ids, img = inputs(batch=2, seq=3)
    with pytest.raises(loldu.ExportError, match="unknown inputs \\['pixels'\\].*missing inputs \\['input_1'\\]"):
        runner.run({"input_0": ids, "pixels": img})
    with pytest.raises(loldu.ExportError, match="input 'input_1' has shape \\[2, 4, 6, 6\\].*\\[batch, 3, 6, 6\\]"):
        runner.run({"input_0": ids, "input_1": torch.randn(2, 4, 6, 6)})
    with pytest.raises(loldu.ExportError, match="input 'input_0' must be int64"):
        runner.run({"input_0": ids.int(), "input_1": img})
    with pytest.raises(loldu.ExportError, match="2 positional inputs|1 positional inputs"):
        runner.run((ids,))
    # What only the graph can see (a token id past the vocabulary) surfaces as an ExportError too.
    with pytest.raises(loldu.ExportError, match="onnxruntime failed"):
        runner.run({"input_0": ids + 1000, "input_1": img})


def test_provider_choice_and_single_notice(tmp_path):
    _, model = adapted(seed=9)
    path = lx.to_onnx(model, inputs(), tmp_path / "m.onnx").path
    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    from loldu.export import ort_runner

    ort_runner._NOTICES_SHOWN.clear()  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = lx.OrtRunner(path)
        again = lx.OrtRunner(path)  # the same fallback is not announced twice in one process
    notices = [w for w in caught if issubclass(w.category, lx.OrtNotice)]
    assert again.provider == runner.provider
    if runner.provider == "CUDAExecutionProvider":
        assert not notices
        ids, img = inputs(batch=2, seq=3)
        out = runner.run({"input_0": ids.cuda(), "input_1": img.cuda()})  # IO binding, outputs stay on the GPU
        assert out["output_0"].is_cuda
        ref = lx.pytorch_outputs(model, (ids, img))[0]
        assert (out["output_0"].float().cpu() - ref).abs().max() <= 1e-4
    else:
        assert runner.provider == "CPUExecutionProvider"
        assert len(notices) == 1 and "CPUExecutionProvider" in str(notices[0].message)
        assert runner.notice is not None
        if not cuda_ok:
            with pytest.raises(loldu.ExportError, match="provider='cuda'"):
                lx.OrtRunner(path, provider="cuda")


def test_export_file_follows_umask(tmp_path):
    _, model = adapted(seed=7)
    old = os.umask(0o022)
    try:
        lx.to_onnx(model, inputs(), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644 and not no_temp_files(tmp_path)


def test_fp16_unmerged_export_keeps_c_in_fp32(tmp_path):
    from loldu.export.onnx_export import _prepare

    _, model = adapted(seed=8)
    with torch.no_grad():  # a small change: z - D is where fp16 would lose the digits
        for _, layer in loldu.adapted_layers(model):
            layer.loldu_z["default"].copy_(layer.loldu_D * (1 + 1e-3))
    before = snapshot(model)
    _, _, layers, cs, _, _ = _prepare(model, False, False, None, "fp16")
    src = dict(loldu.adapted_layers(model))
    for (n, layer), c in zip(layers, cs):
        assert layer.base_layer.weight.dtype == torch.float16  # the exporter's copy is fp16 ...
        assert c.dtype == torch.float32 and torch.equal(c, src[n].coefficients("default")), n  # ... its c is not
    assert_same_state(model, before)
    rep = lx.to_onnx(model, inputs(), tmp_path / "h.onnx", dtype="fp16", merge=False, check_inputs=inputs(batch=3, seq=4))
    assert rep.max_abs_diff <= rep.parity_bound


def test_unmerged_graph_is_the_ops_translation(tmp_path):
    """merge=False: each adapted linear is the ONNX translation of loldu::adapter_linear, x W^T + b +
    (x U^T) (PL diag(c))^T, three MatMuls against initializers (c folded into PL's), and no node outside
    the default ONNX domain; with c as inputs, PL diag(c) is one Mul (and its Transpose) on the c input.
    Embedding and Conv2d layers export through their plain torch ops."""
    _, model = adapted(seed=10)
    rep = lx.to_onnx(model, inputs(), tmp_path / "u.onnx", merge=False, check_inputs=inputs(batch=2, seq=7))
    rep_c = lx.to_onnx(model, inputs(), tmp_path / "c.onnx", merge=False, adapter_inputs=True,
                       check_inputs=inputs(batch=3, seq=2))
    for r in (rep, rep_c):
        proto = onnx.load(r.path)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
        assert not any("loldu" in n.op_type for n in proto.graph.node)
        assert r.max_abs_diff <= lx.FP32_BOUND
    layers = dict(loldu.adapted_layers(model))
    linears = [n for n, layer in layers.items() if layer.kind in ("linear", "conv1d")]
    proto = onnx.load(rep.path)
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    matmul_weights = Counter(inits.get(n.input[1]) for n in proto.graph.node if n.op_type == "MatMul")
    for n in linears:
        d, k = layers[n].base_matrix().shape
        r = layers[n].rank
        assert matmul_weights[(k, r)] >= 1 and matmul_weights[(r, d)] >= 1, n  # x U^T and t (PL diag c)^T
    # 3 MatMuls per linear, 1 for the embedding's (PL[ids] c) U; c scales the embedding and conv branches.
    assert rep.op_counts["MatMul"] == 3 * len(linears) + 1
    assert rep.op_counts["Mul"] == 2 and "Transpose" not in rep.op_counts
    assert rep_c.op_counts["MatMul"] == rep.op_counts["MatMul"]
    assert rep_c.op_counts["Mul"] == 2 + len(linears) and rep_c.op_counts["Transpose"] == len(linears)
    consumers = {i: n.op_type for n in onnx.load(rep_c.path).graph.node for i in n.input}
    assert all(consumers[lx.C_PREFIX + n] == "Mul" for n in linears)


def test_layers_carry_no_export_state(tmp_path):
    """Layers know nothing of ONNX: no export flags, and exporting changes no attribute of the caller's layers."""
    _, model = adapted(seed=11)
    attrs = {n: dict(vars(layer)) for n, layer in loldu.adapted_layers(model)}
    for n, a in attrs.items():
        assert not [k for k in a if "export" in k or "onnx" in k], n
    assert not hasattr(type(loldu.adapted_layers(model)[0][1]), "_linear")
    lx.to_onnx(model, inputs(), tmp_path / "u.onnx", merge=False)
    lx.to_onnx(model, inputs(), tmp_path / "c.onnx", merge=False, adapter_inputs=True)
    for n, layer in loldu.adapted_layers(model):
        after = vars(layer)
        assert after.keys() == attrs[n].keys(), n
        assert all(after[k] is attrs[n][k] or after[k] == attrs[n][k] for k in after if not isinstance(after[k], dict)), n


def test_parity_with_an_input_the_graph_does_not_use(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, mask, x):  # `mask` unused: still a graph input (the model's signature), fed and ignored
            return self.fc(x)

    m = loldu.inject(M(), loldu.LoLDUConfig(rank=2, target_modules=["fc"]))
    perturb(m)
    ex = {"mask": torch.ones(3, dtype=torch.long), "x": torch.randn(2, 6)}
    check = {"x": torch.randn(5, 6), "mask": torch.ones(4, dtype=torch.long)}  # by name, in another order
    for kw in ({}, {"merge": False}):
        rep = lx.to_onnx(m, ex, tmp_path / "m.onnx", check_inputs=check, **kw)
        assert rep.input_names == ["mask", "x"] and rep.max_abs_diff <= lx.FP32_BOUND


@pytest.mark.parametrize("feeds, match", [
    (None, "takes a dict .* got NoneType"),
    ("input_0", "takes a dict .* got str"),
    (b"x", "takes a dict .* got bytes"),
    (7, "takes a dict .* got int"),
    ([[1, 2, 3], [[0.5]]], "input 'input_0' must be a numpy array or a torch tensor, got list"),
    ({"input_0": [[1, 2, 3]], "input_1": None}, "input 'input_0' must be a numpy array or a torch tensor, got list"),
])
def test_runner_run_rejects_what_is_not_feeds(tmp_path, feeds, match):
    _, model = adapted(seed=8)
    runner = lx.OrtRunner(lx.to_onnx(model, inputs(), tmp_path / "m.onnx").path, provider="cpu")
    with pytest.raises(loldu.ExportError, match=match) as e:
        runner.run(feeds)
    assert str(tmp_path / "m.onnx") in str(e.value)


@pytest.mark.parametrize("where, match", [
    ("dir", "is a directory"),
    ("under_a_file", "is not a directory"),
    ("under_a_file_deeper", "does not exist"),
    ("proc", "cannot write '/proc/self/loldu-test.onnx'"),  # creating files there fails for root too
])
def test_export_file_system_errors_are_export_errors(tmp_path, where, match):
    _, model = adapted(seed=7)
    (tmp_path / "d.onnx").mkdir()
    (tmp_path / "plain").write_text("x")
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    path = {"dir": tmp_path / "d.onnx", "under_a_file": tmp_path / "plain" / "m.onnx",
            "under_a_file_deeper": tmp_path / "plain" / "sub" / "m.onnx", "proc": "/proc/self/loldu-test.onnx"}[where]
    before = snapshot(model)
    with pytest.raises(loldu.ExportError, match=match) as e:
        lx.to_onnx(model, inputs(), path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", "plain"] and os.listdir(tmp_path / "d.onnx") == []
    assert_same_state(model, before)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_export_into_read_only_directory_is_export_error(tmp_path):
    _, model = adapted(seed=7)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(loldu.ExportError, match="PermissionError"):
            lx.to_onnx(model, inputs(), tmp_path / "ro" / "m.onnx")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert os.listdir(tmp_path / "ro") == []


def test_next_export_removes_killed_exports_temporaries(tmp_path):
    """A killed export's temporary (unlocked, writer gone) is removed by the next export to that path;
    a live export's (flocked) one, and other paths' ones, stay. tests/test_crash_safety.py kills real ones."""
    import subprocess
    import sys

    fcntl = pytest.importorskip("fcntl")
    _, model = adapted(seed=7)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [f".m.onnx.{gone.pid}-ab3_9xyz.tmp", f".m.onnx.{gone.pid}-e0e0e0e0.tmp"]
    live, other = f".m.onnx.{gone.pid}-live0000.tmp", f".n.onnx.{gone.pid}-ab3_9xyz.tmp"
    (tmp_path / dead[0]).write_bytes(b"partial onnx")
    (tmp_path / dead[1]).write_bytes(b"")
    for n in (live, other):
        (tmp_path / n).write_bytes(b"partial onnx")
    with open(tmp_path / live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        lx.to_onnx(model, inputs(), tmp_path / "m.onnx")
        assert sorted(os.listdir(tmp_path)) == sorted([live, other, "m.onnx"])
    lx.to_onnx(model, inputs(), tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == sorted([other, "m.onnx"])


def test_reference_backend_exports_the_same_graph(tmp_path):
    """LOLDU_BACKEND=pytorch registers loldu::adapter_linear with reference kernels under the same schema:
    the exporter keeps it one node and translates it the same way, so both backends write the same graph."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys, torch, torch.nn as nn, loldu, loldu.export as lx\n"
        "torch.manual_seed(0)\n"
        "m = loldu.inject(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),\n"
        "                 loldu.LoLDUConfig(rank=2, target_modules=['0', '2'])).eval()\n"
        "reps = [lx.to_onnx(m, torch.randn(3, 8), sys.argv[1] + f'/{i}.onnx', merge=False, adapter_inputs=i == 1,\n"
        "                   check_inputs=torch.randn(5, 8)) for i in range(2)]\n"
        "print(json.dumps([loldu.build_info()['backend']] + [r.op_counts for r in reps]))\n")
    outs = {}
    for backend in ("", "pytorch"):
        env = dict(os.environ, LOLDU_BACKEND=backend)
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["pytorch"][0] == "pytorch"
    assert outs[""][1:] == outs["pytorch"][1:]
    assert outs["pytorch"][1] == {"MatMul": 6, "Add": 4, "Relu": 1}


@pytest.mark.parametrize("edit", ["D truncated", "no rank", "D strings", "no layer"])
def test_corrupted_adapter_metadata_is_an_export_error(tmp_path, edit):
    import json

    onnx = pytest.importorskip("onnx")
    m = loldu.inject(torch.nn.Sequential(torch.nn.Linear(16, 16)), loldu.LoLDUConfig(rank=4, target_modules=["0"]))
    p = tmp_path / "m.onnx"
    lx.to_onnx(m.eval(), torch.randn(2, 16), p, merge=False, adapter_inputs=True)
    loldu.save_adapter(m, tmp_path / "ad")
    proto = onnx.load(str(p))
    meta = json.loads(proto.metadata_props[0].value)
    rec = meta["layers"][0]
    if edit == "D truncated":
        rec["D"] = rec["D"][:2]
    elif edit == "no rank":
        rec.pop("rank")
    elif edit == "D strings":
        rec["D"] = [str(v) for v in rec["D"]]
    else:
        rec.pop("layer")
    proto.metadata_props[0].value = json.dumps(meta)
    onnx.save(proto, str(p))
    with pytest.raises(loldu.ExportError, match="corrupted loldu adapter metadata"):
        lx.adapter_feeds(tmp_path / "ad", str(p))


def test_export_dtype_follows_the_model_and_refuses_what_ort_cannot_run(tmp_path):
    """An fp16 model exports as fp16 by default (its graph is fp16; the fp16 parity bound applies); asked for
    fp32, or given bf16 weights (no ONNX Runtime CPU kernels), it is refused saying what to pass."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 12)).eval()
    half = copy.deepcopy(model).half()
    rep = lx.to_onnx(half, torch.randn(2, 16).half(), tmp_path / "h.onnx", check_inputs=torch.randn(3, 16).half())
    assert rep.dtype == "fp16"
    with pytest.raises(loldu.ExportError, match="fp16 weights; pass dtype='fp16'"):
        lx.to_onnx(half, torch.randn(2, 16).half(), tmp_path / "h32.onnx", dtype="fp32")
    with pytest.raises(loldu.ExportError, match="bf16 weights"):
        lx.to_onnx(copy.deepcopy(model).bfloat16(), torch.randn(2, 16).bfloat16(), tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx"]
