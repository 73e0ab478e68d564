"""The tree stays clean under the ruff configuration in pyproject.toml."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it is pinned in requirements.txt)")
    out = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


# Size limits that keep each module one concern and each function readable on one screen.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _python_sources():
    return sorted(p for d in ("python/loldu", "export") for p in (ROOT / d).rglob("*.py"))


def test_modules_and_functions_stay_small():
    import ast

    too_long = []
    for path in _python_sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines (function limit {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)
