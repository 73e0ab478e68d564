"""The README's examples are code: each section's ```python blocks are extracted and run."""
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def run_section(section: str, owner: str) -> None:
    text = README.read_text()
    start, end = f"<!-- section: {section} (owner: {owner}) -->", f"<!-- /section: {section} -->"
    body = text[text.index(start) + len(start) : text.index(end)]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"the {section} section holds no ```python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README}:{section}[{i}]", "exec"), {"__name__": "readme_example"})


def test_intro_factorization_example_runs(capsys):
    run_section("intro", "core")
    assert "pivots" in capsys.readouterr().out


def test_python_api_example_runs(capsys):
    run_section("python-api", "model API")
    out = capsys.readouterr().out
    assert "trainable params: 12 ||" in out and "adapter_model.safetensors" in out


def test_export_example_runs(capsys):
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-fallback notice
        run_section("export", "export")
    out = capsys.readouterr().out
    assert "merged adapter: default" in out and "max |ORT - PyTorch|" in out
