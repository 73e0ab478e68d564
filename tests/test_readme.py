"""The README's examples are code: each section's ```python blocks are extracted and run."""
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def run_section(heading: str) -> None:
    """Runs every ```python block of the README section whose `## ` heading starts with `heading`."""
    text = README.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    body = next((s for s in sections if s.startswith(heading)), None)
    assert body is not None, f"README has no section '## {heading}...'"
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"the section '{heading}' holds no ```python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README}:{heading}[{i}]", "exec"), {"__name__": "readme_example"})


def test_quick_start_runs(capsys):
    """The transformers quick start at the top of the README, as written."""
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-fallback notice, transformers' notes on the new head
        run_section("Quick start")
    out = capsys.readouterr().out
    assert "trainable params:" in out and "adapter_model.safetensors" in out
    assert "outputs: logits" in out and "max |ORT - PyTorch|" in out


def test_intro_factorization_example_runs(capsys):
    run_section("The factorization")
    assert "pivots" in capsys.readouterr().out


def test_python_api_example_runs(capsys):
    run_section("Python API")
    out = capsys.readouterr().out
    assert "trainable params: 12 ||" in out and "adapter_model.safetensors" in out


def test_export_example_runs(capsys):
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-fallback notice
        run_section("Export to ONNX")
    out = capsys.readouterr().out
    assert "merged adapter: default" in out and "max |ORT - PyTorch|" in out
