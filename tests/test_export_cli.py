"""`loldu export` (in-process through loldu.cli.main, and as `python -m loldu`)."""
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import loldu
from loldu.cli import main

pytest.importorskip("onnxruntime")
lx = pytest.importorskip("loldu.export")

SPEC_MODULE = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 6)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def tiny(seed=0):
        torch.manual_seed(seed)
        return Net()

    def other():
        return tiny(seed=1)

    def example_inputs():
        return torch.randn(4, 12)
''')


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "loldu_cli_testmod.py").write_text(SPEC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("loldu_cli_testmod", None)
    import loldu_cli_testmod as mod
    return mod


def trained_adapter(mod, directory, factory="tiny", seed=0):
    model = loldu.inject(getattr(mod, factory)(), loldu.LoLDUConfig(rank=3, target_modules=["fc1", "fc2"]))
    torch.manual_seed(seed + 10)
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            z = layer.loldu_z["default"]
            z.add_(0.5 * torch.randn_like(z) * (z.abs() + 0.1))
    loldu.save_adapter(model, directory)
    return model.eval()


def leftovers(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".onnx") or f.endswith(".tmp"))


def test_cli_export_merged_and_adapter_inputs(spec, tmp_path, capsys):
    model = trained_adapter(spec, tmp_path / "ad")
    out = tmp_path / "m.onnx"
    assert main(["export", "--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "ad"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "merged adapter: default" in text and "parity (CPUExecutionProvider)" in text
    x = torch.randn(9, 12)
    y = lx.OrtRunner(out, provider="cpu").run({"input": x})["output"]
    with torch.no_grad():
        ref = model(x)
    assert np.abs(y - ref.numpy()).max() <= 1e-4

    out_c = tmp_path / "c.onnx"
    assert main(["export", "--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "ad"),
                 "--out", str(out_c), "--adapter-inputs", "--fp16"]) == 0
    assert "adapter inputs: 2 c vectors" in capsys.readouterr().out
    runner = lx.OrtRunner(out_c, provider="cpu")
    y16 = runner.run({"input": x.half()}, adapter=tmp_path / "ad")["output"]
    assert y16.dtype == np.float16
    assert np.abs(y16.astype(np.float32) - ref.numpy()).max() <= lx.parity_bound("fp16", [ref])


def nest_stored_config(directory):
    """The adapter's config (stored in its weights file, hash updated) replaced by [[[...]]] 100000 deep."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    w = directory / "adapter_model.safetensors"
    with safe_open(str(w), "pt") as f:
        meta = f.metadata()
    text = "[" * 100000 + "]" * 100000
    meta.update(loldu_config=text, loldu_config_sha256=hashlib.sha256(text.encode()).hexdigest())
    save_file(load_file(w), str(w), metadata=meta)


def nest_format_1_config(directory):
    """A format-1 adapter (config only in adapter_config.json) whose config is [[[...]]] 100000 deep."""
    from safetensors.torch import load_file, save_file

    text = ("[" * 100000 + "]" * 100000).encode()
    (directory / "adapter_config.json").write_bytes(text)
    w = directory / "adapter_model.safetensors"
    save_file(load_file(w), str(w), metadata={"format": "pt", "loldu_format": "loldu-adapter/1",
                                              "config_sha256": hashlib.sha256(text).hexdigest()})


@pytest.mark.parametrize("case", ["no_base", "bad_spec", "no_adapter", "foreign_adapter", "no_out_dir", "not_onnx",
                                  "inputs_without_adapter", "out_is_a_dir", "out_under_a_file", "out_read_only",
                                  "nested_config", "nested_format_1_config"])
def test_cli_errors_one_line_nonzero_no_file(case, spec, tmp_path, capsys):
    trained_adapter(spec, tmp_path / "ad")
    trained_adapter(spec, tmp_path / "foreign", factory="other")
    out = tmp_path / "m.onnx"
    (tmp_path / "dirs" / "m.onnx").mkdir(parents=True)
    (tmp_path / "plain").write_text("x")
    if case == "out_read_only" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    if case.startswith("nested"):
        (nest_stored_config if case == "nested_config" else nest_format_1_config)(tmp_path / "ad")
    args = {
        "no_base": ["--base", str(tmp_path / "nowhere"), "--out", str(out)],
        "bad_spec": ["--base", "loldu_cli_testmod:missing", "--out", str(out)],
        "no_adapter": ["--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "nope"), "--out", str(out)],
        "foreign_adapter": ["--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "foreign"), "--out", str(out)],
        "no_out_dir": ["--base", "loldu_cli_testmod:tiny", "--out", str(tmp_path / "sub" / "m.onnx")],
        "not_onnx": ["--base", "loldu_cli_testmod:tiny", "--out", str(tmp_path / "m.pt")],
        "inputs_without_adapter": ["--base", "loldu_cli_testmod:tiny", "--out", str(out), "--adapter-inputs"],
        "out_is_a_dir": ["--base", "loldu_cli_testmod:tiny", "--out", str(tmp_path / "dirs" / "m.onnx")],
        "out_under_a_file": ["--base", "loldu_cli_testmod:tiny", "--out", str(tmp_path / "plain" / "m.onnx")],
        # /proc: a directory where even root cannot create files
        "out_read_only": ["--base", "loldu_cli_testmod:tiny", "--out", "/proc/self/loldu-test.onnx"],
        "nested_config": ["--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "ad"), "--out", str(out)],
        "nested_format_1_config": ["--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "ad"),
                                   "--out", str(out)],
    }[case]
    assert main(["export"] + args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("loldu export: error: ") and "\n" not in err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path / "dirs" / "m.onnx") == []
    where = {"out_is_a_dir": "is a directory", "out_under_a_file": "is not a directory",
             "out_read_only": "/proc/self/loldu-test.onnx", "nested_config": "nested too deeply",
             "nested_format_1_config": "nested too deeply"}.get(case)
    if where:
        assert where in err, err


def test_cli_stale_config_copy_is_one_warning_line(spec, tmp_path, capsys):
    """A nested (or otherwise stale) loldu_config.json copy is ignored: the weights file decides."""
    trained_adapter(spec, tmp_path / "ad")
    (tmp_path / "ad" / "loldu_config.json").write_text("[" * 100000 + "]" * 100000)
    assert main(["export", "--base", "loldu_cli_testmod:tiny", "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m.onnx")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("loldu export: warning: ") and "loldu_config.json" in err and "\n" not in err


def test_cli_subprocess_errors_have_no_traceback(spec, tmp_path):
    """As users run it: `--out` an existing directory, and an adapter nested 100000 deep."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    trained_adapter(spec, tmp_path / "ad")
    nest_stored_config(tmp_path / "ad")
    (tmp_path / "d.onnx").mkdir()
    for extra in (["--out", str(tmp_path / "d.onnx")], ["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m.onnx")]):
        r = subprocess.run([sys.executable, "-m", "loldu", "export", "--base", "loldu_cli_testmod:tiny"] + extra,
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("loldu export: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_python_dash_m_loldu(spec, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    ok = subprocess.run([sys.executable, "-m", "loldu", "export", "--base", "loldu_cli_testmod:tiny",
                         "--out", str(tmp_path / "base.onnx")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "merged adapter: none" in ok.stdout and (tmp_path / "base.onnx").is_file()
    bad = subprocess.run([sys.executable, "-m", "loldu", "export", "--base", "loldu_cli_testmod:tiny",
                          "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("loldu export: error:")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_example_inputs_failure_is_one_line(spec, tmp_path, capsys, monkeypatch):
    def broken():
        raise ValueError("no tokenizer\nhere")

    monkeypatch.setattr(spec, "example_inputs", broken)
    assert main(["export", "--base", "loldu_cli_testmod:tiny", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("loldu export: error: ") and "example_inputs() failed" in err and "\n" not in err
    assert leftovers(tmp_path) == []


def test_cli_default_opset_is_the_exporters():
    from loldu.cli import build_parser
    from loldu.export.onnx_export import DEFAULT_OPSET

    args = build_parser().parse_args(["export", "--base", "x:y", "--out", "m.onnx"])
    assert args.opset == DEFAULT_OPSET


def test_cli_rebuilds_a_task_model_from_the_adapter(tmp_path):
    """An adapter trained on AutoModelForSequenceClassification (task head saved with it) exports from the
    plain model directory: the CLI rebuilds the recorded class with the head's label count."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import loldu
    from loldu.presets import minilm_path

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, num_labels=3).eval()
    model = loldu.inject(model, loldu.LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            layer.loldu_z["default"].add_(torch.randn_like(layer.loldu_z["default"]) * 0.05)
        model.classifier.modules_to_save["default"].weight.normal_()
    loldu.save_adapter(model, tmp_path / "ad")
    out = tmp_path / "cls.onnx"
    r = subprocess.run([sys.executable, "-m", "loldu", "export", "--base", str(path), "--adapter", str(tmp_path / "ad"),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "outputs: logits" in r.stdout and "parity" in r.stdout
    import onnx

    logits = [o for o in onnx.load(str(out), load_external_data=False).graph.output if o.name == "logits"][0]
    assert logits.type.tensor_type.shape.dim[-1].dim_value == 3  # the saved head, not a fresh 2-label one
