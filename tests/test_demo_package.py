"""The demo ships in the package: a wheel holds loldu/demo.py, and `loldu demo` runs from an install
outside the source tree (docs/install.md). One wheel build (no compiler: LOLDU_NO_EXTENSION=1) and one
--quick demo run (8 steps per training run, no export)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "LOLDU_NO_EXTENSION": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(out),
                          str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = out.glob("loldu-*.whl")
    return whl


def test_wheel_ships_the_demo_and_its_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"loldu/demo.py", "loldu/demo_task.py", "loldu/datasets.py", "loldu/adapter_spec.json"} <= names
    assert "Provides-Extra: hf" in meta and "Provides-Extra: export" in meta
    assert 'transformers==5.24.0; extra == "hf"' in meta and 'afinn==0.1; extra == "hf"' in meta


def test_loldu_demo_runs_from_an_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    # The installed copy first on the path; the other packages (torch, transformers, ...) from this environment.
    env = {**os.environ, "PYTHONPATH": str(site), "LOLDU_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "loldu", "demo", "--quick"], capture_output=True, text=True, cwd=away,
                         env=env, timeout=900)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    out = res.stdout
    assert "[1] head only" in out and "[2] LoLDU" in out and "identical logits: True" in out, out
    assert "demo finished" in out
    located = subprocess.run([sys.executable, "-c", "import loldu.demo; print(loldu.demo.__file__)"], capture_output=True,
                             text=True, cwd=away, env=env, timeout=120)
    assert located.stdout.strip().startswith(str(site)), located.stdout
