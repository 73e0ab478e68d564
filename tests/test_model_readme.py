"""The README's Python API example is code: extract it and run it."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- section: python-api (owner: model API) -->", "<!-- /section: python-api -->"


def test_model_readme_python_api_example_runs(capsys):
    text = README.read_text()
    section = text[text.index(START) + len(START) : text.index(END)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the python-api section should hold exactly one ```python example"
    exec(compile(blocks[0], f"{README}:python-api", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "trainable params: 12 ||" in out and "adapter_model.safetensors" in out
