"""Every loldu op passes torch.library.opcheck (schema, fake kernel, autograd registration, AOT
dispatch) on every backend this process runs (the compiled kernels, or the reference registered as
the same ops under LOLDU_BACKEND=pytorch) and every device present."""
import pytest
import torch

import loldu
from loldu.reference import SCHEMAS

OPS = torch.ops.loldu


def _factors(d, k, r, device, dtype=torch.float32):
    W = torch.randn(d, k, device=device, dtype=dtype)
    f = loldu.ops.ldu(W, r)
    return W, f


@pytest.mark.parametrize("shape,r", [((30, 20), 1), ((20, 30), 20), ((3, 40, 24), 7)])
@pytest.mark.parametrize("pivoting", ["partial", "none"])
def test_opcheck_ldu(shape, r, pivoting, device):
    W = torch.randn(*shape, device=device)
    torch.library.opcheck(OPS.ldu, (W, r, pivoting))


@pytest.mark.parametrize("batched", [False, True])
def test_opcheck_ldu_from_pivots(batched, device):
    W = torch.randn(*((4,) if batched else ()), 36, 28, device=device, dtype=torch.float64)
    pivots = loldu.ops.ldu(W, 9).pivots
    torch.library.opcheck(OPS.ldu_from_pivots, (W, pivots))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("need_grad_x", [False, True])
def test_opcheck_adapter_linear_backward(per_row, need_grad_x, device):
    d, k, r, n = 24, 18, 5, 7
    W, f = _factors(d, k, r, device)
    x = torch.randn(n, k, device=device)
    g = torch.randn(n, d, device=device)
    c = torch.randn(*((n,) if per_row else ()), r, device=device)
    torch.library.opcheck(OPS.adapter_linear_backward, (g, x, W, f.PL, f.U, c, need_grad_x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_delta_weight(dtype, device):
    W, f = _factors(22, 16, 6, device, dtype)
    c = torch.randn(6, device=device, dtype=f.D.dtype, requires_grad=True)
    torch.library.opcheck(OPS.delta_weight, (f.PL, f.U, c))


def test_backward_op_matches_autograd_of_the_reference(device):
    """The backward op's formula against autograd through the plain forward, in float64."""
    from loldu.reference import adapter_linear_reference

    d, k, r = 26, 19, 6
    W, f = _factors(d, k, r, device, torch.float64)
    x = torch.randn(3, 5, k, device=device, dtype=torch.float64, requires_grad=True)
    c = torch.randn(r, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, d, device=device, dtype=torch.float64)
    gx_ref, gc_ref = torch.autograd.grad(adapter_linear_reference(x, W, None, f.PL, f.U, c), (x, c), g)
    gx, gc = OPS.adapter_linear_backward(g, x.detach(), W, f.PL, f.U, c.detach(), True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, gc_ref, rtol=1e-12, atol=1e-12)


def test_schemas_are_the_ones_python_declares():
    """The reference backend defines the ops from reference.SCHEMAS; a compiled build must agree."""
    for name, schema in SCHEMAS.items():
        got = str(getattr(OPS, name).default._schema)
        assert got == str(torch._C.parse_schema("loldu::" + schema)), (got, schema)
