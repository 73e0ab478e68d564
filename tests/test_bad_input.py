"""Bad input and numerically hostile weights: a named loldu error, or a correct result, never a
silent NaN/Inf. The compiled factorization and the pure-PyTorch reference must agree on each case."""
import warnings

import pytest
import torch
import torch.nn as nn

import loldu
from loldu.reference import ldu_reference

COMPILED = loldu.build_info()["backend"] != "pytorch"
# loldu.ops.ldu runs the op (the compiled kernel, or the reference registered as the op); the reference
# function is also called directly, so both sides are checked on a compiled build.
BACKENDS = [pytest.param(loldu.ops.ldu, id="op"), pytest.param(ldu_reference, id="reference")]


def _scaled_leading(d, k, cols, factor, dtype=torch.float32):
    W = torch.randn(d, k, dtype=dtype)
    W[:, :cols] *= factor
    return W


@pytest.mark.parametrize("ldu", BACKENDS)
@pytest.mark.parametrize("factor,rank", [(3e-39, 3), (1e-30, 4), (1e-20, 4), (1e-12, 2)])
def test_leading_columns_far_below_the_rest_are_refused(ldu, factor, rank):
    # Relative to W[:, :r] alone these pivots look fine; against the pivot rows (every column)
    # they are negligible and U would reach 1/factor (Inf for the subnormal case).
    W = _scaled_leading(64, 48, rank, factor)
    with pytest.raises(loldu.FactorizationError) as e:
        ldu(W, rank)
    msg = str(e.value)
    assert "64, 48" in msg and f"rank={rank}" in msg
    assert ("scaled far below the rest" in msg) or ("too small to factorize" in msg)


@pytest.mark.parametrize("ldu", BACKENDS)
def test_uniformly_subnormal_weight_is_refused_with_a_reason(ldu):
    W = torch.rand(64, 48) * 1e-39  # every entry subnormal in fp32
    with pytest.raises(loldu.FactorizationError, match="too small to factorize in float32") as e:
        ldu(W, 8)
    assert "nan" not in str(e.value).lower()


@pytest.mark.parametrize("ldu", BACKENDS)
def test_fp64_leading_columns_far_below_the_rest_are_refused(ldu):
    W = _scaled_leading(40, 30, 3, 1e-30, torch.float64)
    with pytest.raises(loldu.FactorizationError, match="scaled far below the rest"):
        ldu(W, 3)


@pytest.mark.parametrize("ldu", BACKENDS)
def test_factor_growth_beyond_one_over_eps_is_refused(ldu):
    # Without pivoting: pivot 1e-4, then a Schur complement of ~1e4 over a pivot of ~1e-3, so
    # U's second row reaches ~1e7 > 1/eps(fp32) although each pivot passes the scale test.
    W = torch.randn(64, 48) * 0.1
    W[0, 0], W[1, 0], W[0, 1], W[1, 1] = 1e-4, 1.0, 9.99e-5, 1.0
    W[0, 2:] = 1.0
    with pytest.raises(loldu.FactorizationError, match="grows to max"):
        ldu(W, 2, pivoting="none")


@pytest.mark.parametrize("ldu", BACKENDS)
def test_accepted_factors_are_finite_and_bounded(ldu):
    # Moderately scaled leading columns stay accepted, and what is returned is finite.
    W = _scaled_leading(64, 48, 4, 1e-3)
    PL, D, U, _ = ldu(W, 8)
    for t in (PL, D, U):
        assert torch.isfinite(t).all()
    assert U.abs().max() < 1 / torch.finfo(torch.float32).eps


@pytest.mark.skipif(not COMPILED, reason="needs the compiled ops")
def test_compiled_and_reference_refuse_the_same_cases():
    g = torch.Generator().manual_seed(1234)
    for factor in (1e-2, 1e-5, 1e-8, 1e-20, 1e-30, 3e-39):
        for rank in (1, 3, 6):
            W = torch.randn(50, 40, generator=g)
            W[:, :rank] *= factor
            outcome = []
            for f in (loldu.ops.ldu, ldu_reference):
                try:
                    f(W, rank)
                    outcome.append("ok")
                except loldu.FactorizationError as e:
                    outcome.append("scale" if "far below" in str(e) else "tiny" if "too small" in str(e) else str(e))
            assert outcome[0] == outcome[1], (factor, rank, outcome)


def test_float8_weight_gets_a_dtype_message():
    W = torch.randn(8, 8).to(torch.float8_e4m3fn)
    with pytest.raises(loldu.FactorizationError, match="fp64, fp32, fp16 or bf16") as e:
        loldu.ops.ldu(W, 2)
    assert "loldu_ldu" not in str(e.value)  # no internal kernel name
    with pytest.raises(ValueError, match="fp64, fp32, fp16 or bf16"):
        torch.ops.loldu.ldu(W, 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_raw_op_and_wrapper_refuse_dtypes_alike(dtype):
    W = torch.ones(8, 8, dtype=dtype)
    with pytest.raises(loldu.FactorizationError, match="fp64, fp32, fp16 or bf16"):
        loldu.ops.ldu(W, 2)
    # The raw op raises ValueError (the base class of every loldu error) with the same words.
    with pytest.raises(ValueError, match="fp64, fp32, fp16 or bf16"):
        torch.ops.loldu.ldu(W, 2)


def test_adapter_linear_names_the_bias_dtype():
    f = loldu.ops.ldu(torch.randn(8, 6), 3)
    with pytest.raises(loldu.ShapeError, match="bias is torch.float64 but x is torch.float32"):
        loldu.ops.adapter_linear(torch.randn(2, 6), torch.randn(8, 6), torch.randn(8).double(), f.PL, f.U, torch.zeros(3))


def test_adapter_linear_refuses_float8():
    f8 = torch.float8_e4m3fn
    f = loldu.ops.ldu(torch.randn(8, 6), 3)
    with pytest.raises(loldu.ShapeError, match="x must be float64, float32, float16 or bfloat16"):
        loldu.ops.adapter_linear(torch.randn(2, 6).to(f8), torch.randn(8, 6).to(f8), None, f.PL.to(f8), f.U.to(f8),
                             torch.zeros(3))


def test_layers_run_on_the_meta_device():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    loldu.inject(model, loldu.LoLDUConfig(rank=3, target_modules=["0", "2"]))
    meta = model.to("meta")
    y = meta(torch.randn(4, 6, device="meta"))
    assert y.shape == (4, 5) and y.device.type == "meta"


@pytest.mark.parametrize("factor_dtype", [None, "float32"])
def test_fp16_layer_with_large_factors_equals_base_at_init(factor_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).half()
    with torch.no_grad():
        lin.weight[:, :8] *= 1e-4  # U grows to ~1e4: x U^T overflows fp16
    x = torch.randn(5, 64).half()
    base = lin(x)
    model = nn.Sequential(lin)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loldu.inject(model, loldu.LoLDUConfig(rank=8, target_modules=["0"], factor_dtype=factor_dtype))
    layer = model[0]
    assert layer.loldu_U.dtype == torch.float32
    if factor_dtype is None:
        assert any("stored in float32" in str(m.message) and "'0'" in str(m.message) for m in w)
    y = model(x)
    # At init the layer computes the base layer's own forward plus an exact zero.
    assert torch.equal(y, base)
    y.float().square().mean().backward()
    assert torch.isfinite(layer.loldu_z["default"].grad).all()
    with torch.no_grad():
        layer.loldu_z["default"].add_(1e-6 * torch.randn(8))
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("kind", ["embedding", "conv2d"])
def test_fp16_embedding_and_conv_with_large_factors_stay_finite(kind):
    torch.manual_seed(0)
    if kind == "embedding":
        mod = nn.Embedding(40, 48).half()
        x = torch.randint(0, 40, (3, 7))
    else:
        mod = nn.Conv2d(6, 12, 3).half()
        x = torch.randn(2, 6, 9, 9).half()
    with torch.no_grad():
        flat = mod.weight.view(mod.weight.shape[0], -1)
        flat[:, :4] *= 1e-4
    base = mod(x)
    model = nn.Sequential(mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loldu.inject(model, loldu.LoLDUConfig(rank=4, target_modules=["0"]))
    y = model(x)
    assert torch.equal(y, base)
    y.float().square().mean().backward()
    assert torch.isfinite(model[0].loldu_z["default"].grad).all()
