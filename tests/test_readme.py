"""The README's examples are code: each section's ```python blocks are extracted and run; its links and
those of docs/*.md lead somewhere."""
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def run_section(heading: str, page: Path = README) -> None:
    """Runs the ```python blocks of the `page` section (README by default) whose `## ` heading starts with
    `heading`, in order and in one namespace (a section's later blocks continue its first one, as a reader
    would)."""
    text = page.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    body = next((s for s in sections if s.startswith(heading)), None)
    assert body is not None, f"{page.name} has no section '## {heading}...'"
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"the section '{heading}' holds no ```python example"
    namespace = {"__name__": "readme_example"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}:{heading}[{i}]", "exec"), namespace)


def test_quick_start_runs(capsys):
    """The transformers quick start at the top of the README, as written."""
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-fallback notice, transformers' notes on the new head
        run_section("Quick start")
    out = capsys.readouterr().out
    assert "trainable params:" in out and "adapter_model.safetensors" in out
    assert "outputs: logits" in out and "max |ORT - PyTorch|" in out
    assert "suggested learning rate: 0.01" in out


def test_quick_start_states_the_install_line_and_the_learning_rate():
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## Python API")]
    assert 'pip install --no-build-isolation ".[hf,export]"' in quick
    assert "Learning rate: 1e-2" in quick and "lr=config.suggested_lr" in quick
    # The base is loaded once (transformers' load report and its MISSING-head note appear once).
    assert len(re.findall(r"(?<!LoLDU)Model\.from_pretrained\(", quick)) == 1
    import loldu
    assert loldu.LoLDUConfig(target_modules=["query"]).suggested_lr == 1e-2


def test_factorization_example_runs(capsys):
    run_section("The factorization", ROOT / "docs" / "ops.md")
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


def test_python_api_shows_multiple_adapters_and_merge():
    """The workflows the Python API section walks through, each with its own example."""
    body = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    assert "### Multiple adapters" in body and "### Merge and unmerge" in body
    assert len(re.findall(r"```python\n", body)) == 3


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_lead_somewhere(page):
    """Every relative link of the page names a file of the repository and, with a #fragment, one of
    that page's headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if fragment and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M)
            assert fragment in {_anchor(h) for h in headings}, f"{page.name}: link to {target}: no such heading"
