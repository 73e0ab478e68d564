"""The full-rank layer on the packed LU (loldu.ops.lu_packed, loldu.ops.lu_linear): against a float64 dense
formula W(c) = P L diag(D + c) D^{-1} U formed densely, gradcheck, opcheck, the reference backend in a
fresh interpreter, c == 0 against x W0^T, and the op's memory: no (d, k) temporary."""
import json
import os
import subprocess
import sys

import pytest
import torch

import loldu
from loldu.errors import FactorizationError, ShapeError

OPS = torch.ops.loldu
SHAPES = [(48, 48), (61, 37), (37, 61), (300, 140), (140, 300)]


def _packed(d, k, dtype=torch.float64, device="cpu"):
    W = torch.randn(d, k, dtype=dtype, device=device)
    return W, loldu.ops.lu_packed(W)


def _dense(LU, perm, D, c):
    """W(c) in float64 from the factors, formed densely (the oracle the op never builds)."""
    d, k = LU.shape
    m = min(d, k)
    A = LU.double()
    L = A[:, :m].tril(-1) + torch.eye(d, m, dtype=torch.float64, device=A.device)
    U = A[:m].triu()
    Wp = L @ torch.diag((D.double() + c.double()) / D.double()) @ U
    return torch.empty_like(Wp).index_copy_(0, perm, Wp)  # row perm[i] of W is row i of L U


@pytest.mark.parametrize("d,k", SHAPES)
def test_lu_packed_is_ldu_at_full_rank(d, k, device):
    W, (LU, perm, D) = _packed(d, k, device=device)
    m = min(d, k)
    assert LU.shape == (d, k) and perm.shape == (d,) and D.shape == (m,) and perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(d, device=device))
    torch.testing.assert_close(_dense(LU, perm, D, torch.zeros_like(D)), W, rtol=0, atol=1e-12 * W.abs().max())
    f = loldu.ops.ldu(W, m)
    if device == "cpu":  # the same getrf: the same pivots
        assert torch.equal(f.pivots, perm[:m])
        torch.testing.assert_close(f.D, D, rtol=1e-12, atol=0)


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (257,)])
def test_forward_and_gradients_match_the_dense_formula(d, k, lead, device):
    W, (LU, perm, D) = _packed(d, k, device=device)
    c = torch.randn(min(d, k), dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(*lead, k, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, device=device)
    y = loldu.ops.lu_linear(x, LU, perm, D, c, b)
    ref = x @ _dense(LU, perm, D, c).t() + b
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-11 * scale)
    g = torch.randn_like(y)
    gx, gc = torch.autograd.grad(y, (x, c), g)
    rx, rc = torch.autograd.grad(ref, (x, c), g)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-11 * float(rx.abs().max()))
    torch.testing.assert_close(gc, rc, rtol=0, atol=1e-11 * float(rc.abs().max()))


@pytest.mark.parametrize("d,k", [(61, 37), (300, 140), (140, 300), (200, 200)])
def test_fp32_forward_and_gradients_match_the_float64_formula(d, k, device):
    """The fp32 path (on AVX-512 CPUs the leaves' own kernel, with partial 16-column chunks, rows left over
    from its 6-row blocks and both triangle orientations): against the float64 formula on the same fp32
    factors, within fp32 rounding of products of length d + k (bound: 64 u (d + k) of the magnitudes'
    product, u = 2^-24, measured ~1e-6 relative)."""
    W = torch.randn(d, k, device=device) / k ** 0.5
    LU, perm, D = loldu.ops.lu_packed(W)
    c = torch.randn(min(d, k), device=device, requires_grad=True)
    x = torch.randn(253, k, device=device, requires_grad=True)
    y = loldu.ops.lu_linear(x, LU, perm, D, c)
    Wc = _dense(LU, perm, D, c.detach())
    ref = x.detach().double() @ Wc.t()
    mag = x.detach().double().abs() @ Wc.abs().t()
    tol = 64 * 2.0 ** -24 * (d + k)
    assert ((y.double() - ref).abs() <= tol * mag + 1e-30).all()
    g = torch.randn_like(y)
    gx, gc = torch.autograd.grad(y, (x, c), g)
    rx = g.double() @ Wc
    assert ((gx.double() - rx).abs() <= tol * (g.double().abs() @ Wc.abs()) + 1e-30).all()
    c64 = c.detach().double().requires_grad_()
    (rc,) = torch.autograd.grad(x.detach().double() @ _dense(LU, perm, D, c64).t(), c64, g.double())
    torch.testing.assert_close(gc.double(), rc, rtol=0, atol=tol * float(rc.abs().max()) * 10)


def test_gradcheck(device):
    W, (LU, perm, D) = _packed(9, 6, device=device)
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: loldu.ops.lu_linear(x, LU, perm, D, c), (x, c))
    LU2, perm2, D2 = loldu.ops.lu_packed(torch.randn(6, 9, dtype=torch.float64, device=device))
    x2 = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: loldu.ops.lu_linear(x, LU2, perm2, D2, c), (x2, c))


@pytest.mark.parametrize("d,k", [(24, 16), (16, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(d, k, dtype, device):
    W = torch.randn(d, k, dtype=dtype, device=device)
    torch.library.opcheck(OPS.lu_packed, (W,))
    LU, perm, D = loldu.ops.lu_packed(W)
    m = min(d, k)
    x = torch.randn(7, k, dtype=dtype, device=device, requires_grad=True)
    c = torch.randn(m, dtype=D.dtype, device=device, requires_grad=True)
    bias = torch.randn(d, dtype=dtype, device=device)
    torch.library.opcheck(OPS.lu_linear_forward, (x, LU, perm, D, c, bias))
    torch.library.opcheck(OPS.lu_linear_forward, (x, LU, perm, D, c, None))
    u = OPS.lu_linear_forward(x.detach(), LU, perm, D, c.detach(), None)[1]
    g = torch.randn(7, d, dtype=dtype, device=device)
    for need_x, need_c in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(OPS.lu_linear_backward, (g, u, LU, perm, D, c.detach(), need_x, need_c))


@pytest.mark.parametrize("d,k", [(768, 768), (256, 640), (640, 256)])
def test_zero_c_is_the_base_layer_within_the_lu_rounding(d, k):
    """At c == 0 the op computes (x U^T) L^T, W0 only up to the LU's rounding: on random fp32 weights the
    difference from x W0^T measured about 1.4e-5 of max |y| at 768 x 768 (the LU's backward error,
    ~ sqrt(m) eps growth, plus the two GEMMs' rounding); bounded here by 1e-4."""
    W = torch.randn(d, k)
    LU, perm, D = loldu.ops.lu_packed(W)
    x = torch.randn(64, k)
    y = loldu.ops.lu_linear(x, LU, perm, D, torch.zeros_like(D))
    ref = (x.double() @ W.double().t())
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert 0 < err < 1e-4, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    """bf16 computes in bf16, fp16 in fp32 (its range is too small for x U^T): both near the fp64 oracle."""
    W, (LU, perm, D) = _packed(96, 64, torch.float32)
    c = 0.1 * torch.randn(64)
    x = torch.randn(8, 64)
    y = loldu.ops.lu_linear(x.to(dtype), LU.to(dtype), perm, D, c)
    ref = x.double() @ _dense(LU, perm, D, c).t()
    assert y.dtype == dtype
    tol = 0.1 if dtype == torch.bfloat16 else 0.01
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol
    u = OPS.lu_linear_forward(x.to(dtype), LU.to(dtype), perm, D, c, None)[1]
    assert u.dtype == (torch.float32 if dtype == torch.float16 else dtype)


def test_bad_arguments_name_the_shapes():
    W, (LU, perm, D) = _packed(20, 12, torch.float32)
    x, c = torch.randn(3, 12), torch.randn(12)
    with pytest.raises(ShapeError, match=r"x \(\.\.\., k\) must match LU \(d, k\).*x \[3, 11\]"):
        loldu.ops.lu_linear(torch.randn(3, 11), LU, perm, D, c)
    with pytest.raises(ShapeError, match=r"needs perm \(20,\), D \(12,\) and c \(12,\).*c \[11\]"):
        loldu.ops.lu_linear(x, LU, perm, D, torch.randn(11))
    with pytest.raises(ShapeError, match="LU is torch.float64 but x is torch.float32"):
        loldu.ops.lu_linear(x, LU.double(), perm, D, c)
    with pytest.raises(ShapeError, match="perm must be torch.int64"):
        loldu.ops.lu_linear(x, LU, perm.int(), D, c)
    with pytest.raises(ShapeError, match="D and c must be torch.float32"):
        loldu.ops.lu_linear(x, LU, perm, D, c.double())
    with pytest.raises(ShapeError, match=r"bias must be \(20,\)"):
        loldu.ops.lu_linear(x, LU, perm, D, c, torch.randn(12))
    with pytest.raises(FactorizationError, match="negligible pivot"):
        loldu.ops.lu_packed(torch.zeros(6, 4))
    with pytest.raises(FactorizationError, match="NaN or Inf"):
        loldu.ops.lu_packed(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))


@pytest.mark.skipif(loldu.build_info()["backend"] == "pytorch",
                    reason="the reference forms L and U as (d, m) and (m, k) copies")
def test_no_dk_temporary():
    """The compiled op's largest allocation grows with n (d + k) and with the block size times d or k,
    never with d k: in one forward and backward it stays below a sixteenth of one (d, k) matrix."""
    d, k, n = 1536, 1024, 8
    W, (LU, perm, D) = _packed(d, k, torch.float32)
    x = torch.randn(n, k, requires_grad=True)
    c = torch.randn(k, requires_grad=True)
    with torch.profiler.profile(profile_memory=True, record_shapes=True) as prof:
        loldu.ops.lu_linear(x, LU, perm, D, c).sum().backward()
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert 0 < biggest < d * k * 4 / 16, biggest  # a sixteenth of one (d, k) fp32 matrix


PROBE = r"""
import json, torch, loldu
torch.manual_seed(0)
W = torch.randn(50, 30, dtype=torch.float64)
LU, perm, D = loldu.ops.lu_packed(W)
x = torch.randn(6, 30, dtype=torch.float64, requires_grad=True)
c = torch.randn(30, dtype=torch.float64, requires_grad=True)
y = loldu.ops.lu_linear(x, LU, perm, D, c)
f = loldu.ops.ldu(W, 30)
dense = x @ (W + (f.PL * c) @ f.U).t()
g = torch.randn_like(y)
a, b = torch.autograd.grad(y, (x, c), g), torch.autograd.grad(dense, (x, c), g)
print(json.dumps({"backend": loldu.build_info()["backend"], "y": float((y - dense).abs().max()),
                  "gx": float((a[0] - b[0]).abs().max()), "gc": float((a[1] - b[1]).abs().max()),
                  "pivots": bool(torch.equal(perm[:30], f.pivots))}))
"""


def test_reference_backend():
    env = dict(os.environ, LOLDU_BACKEND="pytorch")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["backend"] == "pytorch" and r["pivots"]
    assert r["y"] < 1e-11 and r["gx"] < 1e-11 and r["gc"] < 1e-11, r
