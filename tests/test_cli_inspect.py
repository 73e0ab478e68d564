"""`loldu inspect <adapter dir>` and `loldu demo`'s entry (through loldu.cli.main and the console script)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import loldu
from loldu.adapter_io import fingerprint
from loldu.cli import demo_script, main

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 10)
        self.classifier = nn.Linear(10, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _saved(tmp_path, rank=4, train_scale=True, parametrization="relative"):
    torch.manual_seed(0)
    model = loldu.inject(Net(), loldu.LoLDUConfig(rank=rank, target_modules=["fc1", "fc2"], train_scale=train_scale,
                                                  parametrization=parametrization, modules_to_save=["classifier"]))
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            layer.loldu_z["default"].add_(torch.randn(rank))
            layer.loldu_sigma["default"].mul_(1.0 + torch.rand(()))
    d = tmp_path / "adapter"
    loldu.save_adapter(model, d)
    return model, d


def test_inspect_prints_layers_ranks_sizes_dtype_saved_modules_and_fingerprint(tmp_path, capsys):
    model, d = _saved(tmp_path)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before  # read only
    assert "rank 4, parametrization relative" in out and "sigma trained" in out
    assert "Net" in out  # the model class the adapter was trained on
    for name, layer in loldu.adapted_layers(model):
        W = layer.base_layer.weight
        shape = "x".join(map(str, W.shape))
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert shape in line and "float32" in line and " 4 " in line
        assert fingerprint(W, layer.loldu_pivots).hex()[:16] in line
        assert f"{layer.loldu_sigma['default'].item():.4g}" in line
    assert "classifier: weight 3x10 float32, bias 3 float32 (33 numbers)" in out
    for f in d.iterdir():
        assert f"{f.name} {f.stat().st_size:,} bytes" in out
    # The base fingerprint: sha256 over every layer's fingerprint, recomputed here from the weights.
    fp = b"".join(fingerprint(layer.base_layer.weight, layer.loldu_pivots) for _, layer in loldu.adapted_layers(model))
    assert hashlib.sha256(fp).hexdigest()[:32] in out
    assert "numbers: 10 adapter" in out  # 2 layers x (z of rank 4 + one trained sigma)
    assert "(2 layers x rank 4 + one sigma each" in out


def test_inspect_json(tmp_path, capsys):
    model, d = _saved(tmp_path, rank=3, train_scale=False, parametrization="paper")
    assert main(["inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["rank"] == 3 and info["config"].get("parametrization", "paper") == "paper"
    assert [e["name"] for e in info["layers"]] == [n for n, _ in loldu.adapted_layers(model)]
    assert [e["shape"] for e in info["layers"]] == [[24, 12], [10, 24]]
    assert all(e["rank"] == 3 and e["dtype"] == "float32" for e in info["layers"])
    assert info["trainable"] == {"adapter": 6, "saved_modules": 33}
    assert info["bytes"] == sum(f.stat().st_size for f in d.iterdir())
    assert info["saved_modules"][0]["tensors"]["weight"] == {"shape": [3, 10], "dtype": "float32"}


def test_inspect_refuses_missing_and_corrupted_adapters(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("loldu inspect: error:") and "nope" in err and "\n" not in err
    _, d = _saved(tmp_path)
    f = d / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit in the tensor data
    f.write_bytes(bytes(raw))
    before = f.read_bytes()
    assert main(["inspect", str(d)]) == 1
    err = capsys.readouterr().err.strip()
    assert "adapter_model.safetensors" in err and "corrupted" in err and "\n" not in err
    assert f.read_bytes() == before


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "inspect", "export"))
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0 and "base weight" in capsys.readouterr().out


def test_demo_entry(capsys):
    assert demo_script() == ROOT / "examples" / "demo.py"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loldu demo") and "--steps" in out and "--no-export" in out


def test_console_script():
    exe = shutil.which("loldu", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "loldu"]
    res = subprocess.run(cmd + ["demo", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "usage: loldu demo" in res.stdout
    res = subprocess.run(cmd + ["inspect"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "adapter" in res.stderr  # argparse: the directory is required
