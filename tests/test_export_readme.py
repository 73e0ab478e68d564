"""The README's export example is code: extract it and run it."""
import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- section: export (owner: export) -->", "<!-- /section: export -->"


def test_export_readme_example_runs(capsys):
    text = README.read_text()
    section = text[text.index(START) + len(START) : text.index(END)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the export section should hold exactly one ```python example"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-fallback notice
        exec(compile(blocks[0], f"{README}:export", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "merged adapter: default" in out and "max |ORT - PyTorch|" in out
