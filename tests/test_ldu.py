"""loldu.ops.ldu against torch.linalg.lu (the oracle): values, pivots, shapes, dtypes, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loldu
from loldu.reference import ldu_reference


def oracle(W: torch.Tensor, r: int):
    """Leading-r components of the full LU: what the paper's released code computes."""
    P, L, U = torch.linalg.lu(W)
    D = U.diagonal(dim1=-2, dim2=-1)[..., :r]
    PL = (P @ L)[..., :, :r]
    Ut = U[..., :r, :] / D[..., :, None]
    pivots = P.argmax(dim=-2)[..., :r]
    return PL, D, Ut, pivots


def assert_matches(res, W, r, tol):
    """Same pivots as torch.linalg.lu, values within `tol` relative to each factor's largest entry.

    In fp32 a leading block can be ill-conditioned (full rank of a random square block), and then
    no fp32 algorithm is within 1e-5 of another: there the error against the fp64 truth may not
    exceed 8x the error of torch.linalg.lu's own fp32 result against that truth."""
    PL, D, U, piv = oracle(W, r)
    assert res.PL.shape == PL.shape and res.U.shape == U.shape and res.D.shape == D.shape
    assert torch.equal(res.pivots.cpu(), piv.cpu())
    exact = oracle(W.double(), r) if W.dtype != torch.float64 else None
    for i, (got, want) in enumerate(((res.PL, PL), (res.D, D), (res.U, U))):
        scale = max(1.0, want.abs().max().item())
        err = (got.to(want.dtype) - want).abs().max().item()
        if err > tol * scale and exact is not None:
            truth = exact[i]
            ours, lapack = ((t.double() - truth).abs().max().item() for t in (got, want))
            assert ours <= 8 * lapack, (ours, lapack)
        else:
            assert err <= tol * scale, err
    assert torch.isfinite(res.PL).all() and torch.isfinite(res.U).all()


SHAPES = [(768, 768), (300, 200), (200, 300), (97, 41), (1, 5), (5, 1), (4096, 64), (64, 1500)]


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_full_lu(d, k, dtype, tol, device):
    W = torch.randn(d, k, dtype=dtype, device=device)
    m = min(d, k)
    for r in sorted({1, min(8, m), min(33, m), min(64, m)}):
        assert_matches(loldu.ops.ldu(W, r), W, r, tol)


@pytest.mark.parametrize("d,k", [(64, 64), (96, 40), (40, 96), (768, 768)])
def test_full_rank_float64(d, k, device):
    W = torch.randn(d, k, dtype=torch.float64, device=device)
    r = min(d, k)
    assert_matches(loldu.ops.ldu(W, r), W, r, 1e-9 if r > 100 else 1e-12)


def _item(res, b):
    return loldu.ops.LDUResult(*(t[b] for t in res))


# Full rank, r = min(d, k) (the paper's code adapts every Linear at rank 768): from r = 64 on the
# compiled CPU path factors the panel with LAPACK's getrf (cpp/ldu.cpp, factor_lapack). Square and
# tall: the panel is all of W, so the computation is torch.linalg.lu's own. Wide: getrf on the
# (d, d) panel and on the whole (d, k) W block their columns differently, so in fp32 a near-tie
# could in principle flip a pivot (none in 1000 random (160, 400) matrices; it did happen once in
# 60 at (384, 1536), hence the small wide shape). fp32 on CUDA (custom kernels against cuSOLVER)
# and in the reference backend (an unblocked loop) is left to the fp64 cases: other algorithms,
# where fp32 rounding may flip a near-tie pivot over 160+ steps. A batch is compared one matrix at
# a time: torch.linalg.lu on a CPU batch runs getrf from several OpenMP threads at once, which in
# torch 2.13 + MKL on a 2-core machine printed MKL errors and returned wrong pivots for n >= 160.
@pytest.mark.parametrize("shape", [(256, 256), (384, 200), (160, 400), (3, 160, 160), (2, 90, 200)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_full_rank_matches_full_lu(shape, dtype, tol, device):
    if dtype == torch.float32 and (device != "cpu" or loldu.build_info()["backend"] == "pytorch"):
        pytest.skip("fp32 full rank is compared on the compiled CPU path (LAPACK against LAPACK)")
    W = torch.randn(*shape, dtype=dtype, device=device)
    r = min(shape[-2:])
    res = loldu.ops.ldu(W, r)
    if W.dim() == 2:
        assert_matches(res, W, r, tol)
    else:
        for b in range(W.shape[0]):
            assert_matches(_item(res, b), W[b], r, tol)


@pytest.mark.parametrize("shape,r", [((256, 256), 256), ((384, 200), 200), ((160, 400), 160),
                                     ((3, 160, 160), 160), ((300, 200), 100)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_from_pivots_is_exact(shape, r, dtype, device):
    # ldu_from_pivots with ldu's own pivots runs ldu's very computation (the same getrf call on the
    # same panel, accepted because it picks the given pivots): the factors are bit for bit the same.
    W = torch.randn(*shape, dtype=dtype, device=device)
    res = loldu.ops.ldu(W, r)
    again = loldu.ops.ldu_from_pivots(W, res.pivots)
    for got, want in zip(again, res):
        assert torch.equal(got, want)


def test_large_rank_prescribed_order_falls_back(device):
    """Pivots that partial pivoting would not pick, or pivoting='none' on a panel that needs swaps,
    at r >= 64: getrf's choice is refused and the blocked kernel imposes the order."""
    W = torch.randn(150, 120, dtype=torch.float64, device=device)
    W[80:, :80] += 20 * torch.eye(70, 80, dtype=torch.float64, device=device)  # rows 80.. dominate
    pv = torch.arange(100, device=device)  # partial pivoting would start with rows 80, 81, ...
    got, ref = loldu.ops.ldu_from_pivots(W, pv), ldu_reference(W, 100, pivots=pv)
    assert torch.equal(got.pivots.cpu(), pv.cpu())
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    got, ref = loldu.ops.ldu(W, 100, pivoting="none"), ldu_reference(W, 100, "none")
    assert torch.equal(got.pivots.cpu(), torch.arange(100))
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    # ...while a diagonally dominant panel keeps its order under getrf: both modes agree exactly.
    D = torch.randn(150, 120, dtype=torch.float64, device=device) + 100 * torch.eye(150, 120, dtype=torch.float64,
                                                                                    device=device)
    a, b = loldu.ops.ldu(D, 100, pivoting="none"), loldu.ops.ldu(D, 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(1, 48), k=st.integers(1, 48), data=st.data(), transposed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes_and_ranks(d, k, data, transposed, seed):
    r = data.draw(st.integers(1, min(d, k)), label="r")
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(k, d, generator=g, dtype=torch.float64).t() if transposed else \
        torch.randn(d, k, generator=g, dtype=torch.float64)
    assert_matches(loldu.ops.ldu(W, r), W, r, 1e-10)


def test_batch_equals_one_at_a_time(device):
    W = torch.randn(5, 120, 80, device=device)
    res = loldu.ops.ldu(W, 24)
    assert res.PL.shape == (5, 120, 24) and res.U.shape == (5, 24, 80) and res.pivots.shape == (5, 24)
    # Compiled: exact, r < 64 runs no BLAS call (no blocked GEMM/TRSM, no LAPACK getrf), every
    # matrix the same per-matrix code. The reference backend's batched torch ops (solve_triangular
    # over a batch) may block differently from one matrix: bounded at a few fp32 ulps of the
    # factors' scale.
    exact = loldu.build_info()["backend"] != "pytorch"
    for b in range(5):
        one = loldu.ops.ldu(W[b], 24)
        assert torch.equal(res.pivots[b], one.pivots)
        for got, want in zip(res[:3], one[:3]):
            if exact:
                assert torch.equal(got[b], want)
            else:
                torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("r", [12, 70])  # the blocked kernel; LAPACK's getrf (full rank)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_factorized_in_fp32(dtype, r, device):
    W = torch.randn(90, 70, device=device).to(dtype)
    res = loldu.ops.ldu(W, r)
    assert res.PL.dtype == torch.float32
    ref = loldu.ops.ldu(W.float(), r)
    for got, want in zip(res, ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("r", [16, 100])  # the blocked kernel; LAPACK's getrf on the panel
def test_reads_only_the_panel_and_the_pivot_rows(r, device):
    """Poison every entry the method must not read: the result is unchanged and finite."""
    d, k = 500, 400
    W = torch.randn(d, k, dtype=torch.float64, device=device)
    clean = loldu.ops.ldu(W, r)
    poisoned = W.clone()
    others = torch.ones(d, dtype=torch.bool)
    others[clean.pivots.cpu()] = False
    poisoned[others.to(device), r:] = float("nan")
    res = loldu.ops.ldu(poisoned, r)
    for got, want in zip(res, clean):
        assert torch.equal(got, want)


def test_noncontiguous_input(device):
    base = torch.randn(130, 90, dtype=torch.float64, device=device)
    W = base.t()  # (90, 130) column-major view
    assert_matches(loldu.ops.ldu(W, 30), W, 30, 1e-12)
    assert torch.equal(loldu.ops.ldu(W, 30).U, loldu.ops.ldu(W.contiguous(), 30).U)


def test_no_pivoting_matches_doolittle(device):
    # A diagonally dominant matrix: partial pivoting never swaps, so both modes agree.
    W = torch.randn(60, 50, dtype=torch.float64, device=device) + 100 * torch.eye(60, 50, dtype=torch.float64, device=device)
    a, b = loldu.ops.ldu(W, 20, pivoting="none"), loldu.ops.ldu(W, 20)
    assert torch.equal(a.pivots.cpu(), torch.arange(20))
    assert torch.allclose(a.U, b.U, atol=1e-12) and torch.allclose(a.PL, b.PL, atol=1e-12)
    # ...and with no pivoting the product reproduces the rank-r skeleton W[:, :r] W[:r, :r]^-1 W[:r, :]
    skeleton = W[:, :20] @ torch.linalg.solve(W[:20, :20], W[:20, :])
    assert torch.allclose(a.PL @ torch.diag(a.D) @ a.U, skeleton, atol=1e-9)


def test_from_pivots_reproduces_the_factors(device):
    W = torch.randn(3, 200, 150, device=device)
    res = loldu.ops.ldu(W, 40)
    again = loldu.ops.ldu_from_pivots(W, res.pivots)
    for got, want in zip(again, res):
        assert torch.equal(got, want)


def test_reference_path_agrees(device):
    W = torch.randn(150, 110, dtype=torch.float64, device=device)
    for r in (1, 31, 32, 33, 110):
        res, ref = loldu.ops.ldu(W, r), ldu_reference(W, r)
        assert torch.equal(res.pivots, ref[3])
        for got, want in zip(res[:3], ref[:3]):
            assert torch.allclose(got, want, rtol=0, atol=1e-11)


def test_minilm_every_linear_layer(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_path), local_files_only=True)
    linears = [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 36
    for name, W in linears:
        for r in (16, 128):
            assert_matches(loldu.ops.ldu(W, r), W, r, 1e-4), name
        Wd = W.double()
        assert_matches(loldu.ops.ldu(Wd, min(Wd.shape)), Wd, min(Wd.shape), 1e-8), name


# --- bad input: a loldu error that names the shape, rank and step; W left as it was ----------

def _expect_error(W, rank, match, **kw):
    before = W.clone()
    with pytest.raises(loldu.FactorizationError, match=match) as info:
        loldu.ops.ldu(W, rank, **kw)
    assert torch.equal(W, before) or (torch.isnan(W) == torch.isnan(before)).all()
    return str(info.value)


@pytest.mark.parametrize("rank", [0, -3, 21, 2.0, True, None])
def test_bad_rank(rank):
    msg = _expect_error(torch.randn(30, 20), rank, "rank")
    assert "(30, 20)" in msg or "[30, 20]" in msg


@pytest.mark.parametrize("make", [lambda: torch.ones(8, 8, dtype=torch.int64),
                                  lambda: torch.ones(8, 8, dtype=torch.bool),
                                  lambda: torch.quantize_per_tensor(torch.randn(8, 8), 0.1, 0, torch.qint8),
                                  lambda: torch.randn(8)])
def test_bad_dtype_or_shape(make):
    with pytest.raises(loldu.FactorizationError, match="W must be"):
        loldu.ops.ldu(make(), 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_in_panel(value, device):
    W = torch.randn(40, 30, device=device)
    W[7, 2] = value
    msg = _expect_error(W, 5, "NaN or Inf")
    assert "panel" in msg and "40, 30" in msg


def test_nonfinite_in_a_pivot_row(device):
    W = torch.randn(40, 30, dtype=torch.float64, device=device)
    piv = loldu.ops.ldu(W, 5).pivots
    W[int(piv[3]), 20] = float("nan")
    _expect_error(W, 5, "pivot row")


@pytest.mark.parametrize("make,step", [
    (lambda dev: torch.zeros(50, 40, device=dev), 0),
    # columns 0..2 independent, column 3 a combination of them: step 3 has no pivot
    (lambda dev: torch.cat([(a := torch.randn(50, 3, device=dev)), a @ torch.randn(3, 1, device=dev),
                            torch.randn(50, 36, device=dev)], dim=1), 3),
])
def test_negligible_pivot(make, step, device):
    msg = _expect_error(make(device), 10, "negligible pivot")
    assert f"at step {step} of 10" in msg and "rank=10" in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negligible_pivot_large_rank(dtype, device):
    # getrf does not stop at a tiny pivot; the first step below the tolerance is reported, as the
    # blocked kernel would, and nothing non-finite comes out.
    a = torch.randn(300, 150, dtype=dtype, device=device)
    W = torch.cat([a, a @ torch.randn(150, 1, dtype=dtype, device=device),
                   torch.randn(300, 49, dtype=dtype, device=device)], dim=1)
    msg = _expect_error(W, 200, "negligible pivot")
    assert "at step 150 of 200" in msg and "300, 200" in msg
    Wb = torch.randn(3, 100, 120, dtype=dtype, device=device)
    Wb[1] = 0
    msg = _expect_error(Wb, 100, "negligible pivot")
    assert "at step 0 of 100" in msg and "batch item 1" in msg


def test_nonfinite_large_rank(device):
    W = torch.randn(100, 120, device=device)
    p = int(loldu.ops.ldu(W, 64).pivots[40])
    W[p, 100] = float("nan")
    assert f"pivot row at W[{p}, 100]" in _expect_error(W, 64, "NaN or Inf")
    W[7, 80] = float("nan")
    W[3, 90] = float("inf")
    msg = _expect_error(W, 100, "NaN or Inf")
    assert "panel" in msg and "W[3, 90]" in msg  # the first in W's row order
    # Wilkinson's matrix (growth 2^(n-1) under partial pivoting): U[-1, -1] = 2^199 overflows fp32.
    G = torch.eye(200, device=device) - torch.ones(200, 200, device=device).tril(-1)
    G[:, -1] = 1
    _expect_error(G, 200, "grows to" if device == "cpu" else "loldu.ldu")


def test_bad_pivoting_name():
    _expect_error(torch.randn(10, 10), 3, "pivoting", pivoting="complete")


def test_error_names_batch_item(device):
    W = torch.randn(4, 30, 20, device=device)
    W[2] = 0
    msg = _expect_error(W, 3, "batch item 2")
    assert "negligible pivot" in msg


def test_from_pivots_rejects_bad_pivots():
    W = torch.randn(30, 20)
    with pytest.raises(loldu.FactorizationError, match="out of range"):
        loldu.ops.ldu_from_pivots(W, torch.tensor([0, 31]))
    with pytest.raises(loldu.FactorizationError, match="repeated"):
        loldu.ops.ldu_from_pivots(W, torch.tensor([4, 4, 2]))


def test_build_info_names_the_backend():
    info = loldu.build_info()
    assert info["backend"] in {"compiled-cpu", "compiled-cuda", "jit-cpu", "jit-cuda", "pytorch"}
    assert info["torch"] == torch.__version__
