"""What a source checkout keeps in one place: the generated C++ headers match their Python sources
(cpp/tools/gen_headers.py), cpp/sources.txt lists every source of the builds, and setup.py probes for
compilers only when it builds (docs/install.md)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file() or not (ROOT / "cpp" / "tools").is_dir(),
                                reason="needs a source checkout (the tests run against an installed package)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_headers", ROOT / "cpp" / "tools" / "gen_headers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_headers_are_current():
    for path, text in _generator().headers().items():
        assert (ROOT / path).read_text() == text, f"{path} is stale: run python cpp/tools/gen_headers.py"


def test_generator_refuses_python_without_a_cpp_reading():
    import ast

    gen = _generator()
    with pytest.raises(ValueError, match="no C\\+\\+ translation"):
        gen._expr(ast.parse("x ** 2", mode="eval").body, {"x"})
    assert gen._expr(ast.parse("a - b * c if a < b else min(a, b)", mode="eval").body, {"a", "b", "c"}) == \
        "((a < b) ? (a - (b * c)) : std::min(a, b))"


def test_source_list_names_every_source_once():
    listed = [line.split() for line in (ROOT / "cpp" / "sources.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    paths = [p for _, p in listed]
    assert all(len(entry) == 2 for entry in listed) and len(set(paths)) == len(paths)
    assert {g for g, _ in listed} == {"ops", "cuda", "library", "format"}
    on_disk = {str(p.relative_to(ROOT)) for pattern in ("cpp/*.cpp", "cpp/cuda/*.cpp", "cpp/cuda/*.cu")
               for p in ROOT.glob(pattern)}
    assert set(paths) == on_disk


@pytest.mark.parametrize("env", [{}, {"LOLDU_NO_EXTENSION": "1"}])
def test_setup_version_prints_the_version_alone(env):
    """No CUDA or compiler probing (nor their notices) for a command that builds nothing."""
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr[-2000:]
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert (out.stdout + out.stderr).splitlines() == [version], out.stdout + out.stderr
