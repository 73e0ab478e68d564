"""The three ways `import loldu` finds its ops: the installed extension, a JIT build of cpp/, and
the pure-PyTorch fallback. Each runs in a fresh interpreter and is checked against torch.linalg.lu
and a dense layer."""
import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import loldu
import torch
torch.manual_seed(0)
W = torch.randn(90, 70, dtype=torch.float64)
res = loldu.ops.ldu(W, 12)
P, L, U = torch.linalg.lu(W)
x = torch.randn(4, 70, dtype=torch.float64, requires_grad=True)
c = torch.randn(12, dtype=torch.float64, requires_grad=True)
y = loldu.ops.adapter_linear(x, W, None, res.PL, res.U, c)
dense = x @ (W + (res.PL * c) @ res.U).t()
g = torch.autograd.grad(y.sum(), c)[0]
g_dense = torch.autograd.grad(dense.sum(), c)[0]
try:
    loldu.ops.ldu(torch.zeros(5, 5), 2)
    err = None
except loldu.FactorizationError as e:
    err = str(e)
print(json.dumps({
    "backend": loldu.build_info()["backend"],
    "warnings": [str(w.message) for w in caught if "loldu" in str(w.message)],
    "pivots_equal": bool(torch.equal(res.pivots, P.argmax(0)[:12])),
    "U_err": float((res.U - U[:12] / U.diagonal()[:12, None]).abs().max()),
    "y_err": float((y - dense).abs().max()),
    "grad_err": float((g - g_dense).abs().max()),
    "zero_matrix_error": err,
}))
"""


def probe(env_extra, tmp_path):
    env = dict(os.environ, **env_extra, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result):
    assert result["pivots_equal"]
    assert result["U_err"] < 1e-12 and result["y_err"] < 1e-10 and result["grad_err"] < 1e-10
    assert "negligible pivot" in result["zero_matrix_error"]


def test_pytorch_fallback_warns_once_and_computes_the_same(tmp_path):
    r = probe({"LOLDU_BACKEND": "jit", "LOLDU_NO_JIT": "1"}, tmp_path)
    assert r["backend"] == "pytorch"
    assert len(r["warnings"]) == 1 and "pure-PyTorch" in r["warnings"][0]
    check(r)


def test_forced_reference_path(tmp_path):
    r = probe({"LOLDU_BACKEND": "pytorch"}, tmp_path)
    assert r["backend"] == "pytorch" and r["warnings"] == []
    check(r)


@pytest.mark.skipif(os.environ.get("LOLDU_SKIP_JIT_TEST") == "1", reason="LOLDU_SKIP_JIT_TEST=1")
def test_jit_build_of_the_sources(tmp_path):
    """Builds cpp/ with torch.utils.cpp_extension.load (ninja), as on a machine without loldu._C."""
    r = probe({"LOLDU_BACKEND": "jit", "MAX_JOBS": "2"}, tmp_path)
    assert r["backend"] in ("jit-cpu", "jit-cuda"), r
    assert r["warnings"] == []
    check(r)


def test_installed_extension_is_active():
    import loldu

    if os.environ.get("LOLDU_BACKEND"):
        pytest.skip("LOLDU_BACKEND overrides the installed extension")
    assert loldu.build_info()["backend"].startswith("compiled-")


def test_op_suites_pass_on_the_reference_backend():
    """opcheck, gradcheck and the bad-input suite of every op, with the pure-PyTorch reference
    registered as the ops (what a machine without a compiler runs): every op on every backend."""
    if os.environ.get("LOLDU_BACKEND"):
        pytest.skip("this process already runs one backend by choice")
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in ("test_ops.py", "test_adapter_op.py", "test_bad_input.py")]
    env = dict(os.environ, LOLDU_BACKEND="pytorch")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], env=env,
                         capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(here))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
