"""What a LoLDU layer keeps consistent with its base weight: the frozen factors across
load_state_dict, merge -> unmerge and module casts; fp16 compute; unbatched input to adapter_ids."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, inputs, perturb

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import fingerprint


def _config(rank=3, **kw):
    return LoLDUConfig(rank=rank, target_modules=TARGETS, **kw)


def _reads(layer):
    """What the factorization (and the adapter file's fingerprint) reads: W[:, :r] and W[pivots, :]."""
    M = layer.base_matrix()
    return M[:, :layer.rank].clone(), M[layer.loldu_pivots].clone()


def _factors(model):
    return {n: [t.clone() for t in (layer.loldu_PL, layer.loldu_U, layer.loldu_D, layer.loldu_pivots)]
            for n, layer in loldu.adapted_layers(model)}


# -- load_state_dict -------------------------------------------------------------------------------
def test_load_state_dict_rederives_the_frozen_factors_of_a_new_base(tmp_path):
    base_a = TinyNet()
    a = loldu.inject(copy.deepcopy(base_a), _config())
    perturb(a)
    b = loldu.inject(TinyNet(), _config())  # other base weights, so other factors and pivots
    ids, img = inputs()
    keys = b.load_state_dict(a.state_dict())
    assert not keys.missing_keys and not keys.unexpected_keys
    for (n, la), (_, lb) in zip(loldu.adapted_layers(a), loldu.adapted_layers(b)):
        for ta, tb in zip((la.loldu_PL, la.loldu_U, la.loldu_D, la.loldu_pivots),
                          (lb.loldu_PL, lb.loldu_U, lb.loldu_D, lb.loldu_pivots)):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), n
    for ya, yb in zip(a(ids, img), b(ids, img)):
        assert torch.equal(ya, yb)
    # b's adapter file now describes a's base: it loads onto a fresh copy of it and computes a.
    loldu.save_adapter(b, tmp_path / "b")
    fresh = loldu.load_adapter(copy.deepcopy(base_a), tmp_path / "b")
    for ya, yf in zip(a(ids, img), fresh(ids, img)):
        assert torch.equal(ya, yf)


def test_load_state_dict_of_the_same_base_keeps_the_factors():
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), _config())
    before = {n: layer.loldu_U for n, layer in loldu.adapted_layers(model)}
    other = loldu.inject(copy.deepcopy(base), _config())
    perturb(other)
    model.load_state_dict(other.state_dict())
    for n, layer in loldu.adapted_layers(model):
        assert layer.loldu_U is before[n]  # nothing was factorized again


def test_load_state_dict_into_a_merged_layer_is_refused_when_the_base_differs():
    a = loldu.inject(TinyNet(), _config())
    b = loldu.inject(TinyNet(), _config())
    perturb(b)
    loldu.merge(b)
    own = copy.deepcopy(b.state_dict())
    b.load_state_dict(own)  # the weights it holds: nothing changes, allowed
    layer = dict(loldu.adapted_layers(b))["emb"]  # the first layer load_state_dict visits
    weight, factors = layer.weight.detach().clone(), _factors(b)["emb"]
    with pytest.raises(AdapterError, match="layer 'emb' is merged.*unmerge"):
        b.load_state_dict(a.state_dict())
    assert torch.equal(layer.weight, weight)
    for t, f in zip((layer.loldu_PL, layer.loldu_U, layer.loldu_D, layer.loldu_pivots), factors):
        assert torch.equal(t, f)


def test_load_state_dict_of_a_base_that_cannot_be_factorized_is_refused():
    model = nn.Sequential(nn.Linear(16, 12))
    loldu.inject(model, LoLDUConfig(rank=3, target_modules=["0"]))
    sd = copy.deepcopy(model.state_dict())
    sd["0.base_layer.weight"][:, :3] = 0.0  # a zero panel: no pivot
    weight, factors = model[0].weight.detach().clone(), _factors(model)["0"]
    with pytest.raises(AdapterError, match="layer '0'.*cannot be factorized"):
        model.load_state_dict(sd)
    assert torch.equal(model[0].weight, weight)
    for t, f in zip((model[0].loldu_PL, model[0].loldu_U, model[0].loldu_D, model[0].loldu_pivots), factors):
        assert torch.equal(t, f)


# -- fp16 compute ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_fp16_compute_with_ordinary_factors_equals_base_at_init(kind):
    # Factors of ordinary size (no badly scaled columns), but activations large enough that x U^T
    # leaves fp16's range while the base layer's output stays inside it.
    if kind == "linear":
        mod, x = nn.Linear(1024, 64), torch.randn(8, 1024) * 2000
    elif kind == "conv2d":
        mod, x = nn.Conv2d(64, 16, 3), torch.randn(2, 64, 6, 6) * 2000
    else:
        mod, x = nn.Embedding(50, 32), torch.randint(0, 50, (4, 5))
    model = nn.Sequential(mod.half())
    x = x.half() if x.is_floating_point() else x
    base = model(x)
    assert torch.isfinite(base).all()
    loldu.inject(model, LoLDUConfig(rank=8, target_modules=["0"]))
    assert model[0].loldu_U.dtype == torch.float16  # small factors stay in the weight's dtype
    y = model(x)
    assert torch.equal(y, base)  # the base layer's fp16 output plus an exact zero
    y.float().square().mean().backward()
    assert torch.isfinite(model[0].loldu_z["default"].grad).all()


@pytest.mark.skipif(not torch.amp.is_autocast_available("cpu"), reason="no CPU autocast")
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fp16_autocast_runs_the_adapter_branch_in_fp32(kind):
    if kind == "linear":
        mod, x = nn.Linear(1024, 64), torch.randn(8, 1024) * 2000
    else:
        mod, x = nn.Conv2d(64, 16, 3), torch.randn(2, 64, 6, 6) * 2000
    model = nn.Sequential(mod)
    with torch.autocast("cpu", dtype=torch.float16):
        base = model(x)
    assert base.dtype == torch.float16 and torch.isfinite(base).all()
    loldu.inject(model, LoLDUConfig(rank=8, target_modules=["0"]))
    with torch.autocast("cpu", dtype=torch.float16):
        y = model(x)
    assert torch.equal(y, base)
    perturb(model, scale=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(model(x)).all()


# -- factors a dtype cannot hold ---------------------------------------------------------------------
def _badly_scaled_linear():
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[:, 0] *= 1e-5  # accepted by ldu, but max |U| reaches ~1e5 > fp16's 65504
    return lin


def test_half_cast_keeps_factors_fp16_cannot_hold_in_fp32():
    model = nn.Sequential(_badly_scaled_linear())
    loldu.inject(model, LoLDUConfig(rank=8, target_modules=["0"]))
    assert model[0].loldu_U.abs().max() > torch.finfo(torch.float16).max
    x = torch.randn(6, 64).half()
    base = copy.deepcopy(model[0].base_layer).half()(x)
    model.half()
    layer = model[0]
    assert layer.weight.dtype == torch.float16
    assert layer.loldu_U.dtype == torch.float32 and layer.loldu_PL.dtype == torch.float32
    assert torch.isfinite(layer.loldu_U).all()
    y = model(x)
    assert torch.equal(y, base)
    perturb(model, scale=1e-3)
    assert torch.isfinite(model(x)).all()
    model.to("meta")  # device moves still apply to the kept factors
    assert layer.loldu_U.device.type == "meta" and layer.loldu_U.dtype == torch.float32


def test_half_cast_of_factors_that_fit_still_casts_them():
    model = nn.Sequential(nn.Linear(64, 48))
    loldu.inject(model, LoLDUConfig(rank=8, target_modules=["0"]))
    model.half()
    assert model[0].loldu_U.dtype == torch.float16 and model[0].loldu_PL.dtype == torch.float16
    model.double()
    assert model[0].loldu_U.dtype == torch.float64


def test_factor_dtype_that_cannot_hold_the_factors_stores_fp32_with_a_warning():
    model = nn.Sequential(_badly_scaled_linear())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loldu.inject(model, LoLDUConfig(rank=8, target_modules=["0"], factor_dtype="float16"))
    assert any("'0'" in str(m.message) and "stored in float32" in str(m.message) for m in w)
    layer = model[0]
    assert layer.loldu_U.dtype == torch.float32 and torch.isfinite(layer.loldu_U).all()
    x = torch.randn(6, 64)
    # the fused op at c == 0 (an fp32 weight: no fp32 side branch) against nn.Linear: two GEMM routes,
    # so within a few fp32 ulps of the output's scale rather than bit for bit
    y, base = model(x), layer.base_layer(x)
    torch.testing.assert_close(y, base, rtol=0, atol=8 * torch.finfo(torch.float32).eps * float(base.abs().max()))


# -- merge -> unmerge --------------------------------------------------------------------------------
class _ChannelsLastConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3).to(memory_format=torch.channels_last)

    def forward(self, img):
        return self.conv(img)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_what_the_factorization_reads_exactly(tmp_path, dtype):
    base = TinyNet().to(dtype)
    model = loldu.inject(copy.deepcopy(base), _config())
    perturb(model, scale=2.0)
    before = {n: _reads(layer) for n, layer in loldu.adapted_layers(model)}
    prints = {n: fingerprint(layer.base_matrix(), layer.loldu_pivots) for n, layer in loldu.adapted_layers(model)}
    loldu.merge(model)
    merged = {n: layer.weight.detach().clone() for n, layer in loldu.adapted_layers(model)}
    loldu.unmerge(model)
    for n, layer in loldu.adapted_layers(model):
        cols, rows = _reads(layer)
        assert torch.equal(cols, before[n][0]) and torch.equal(rows, before[n][1]), n
        assert fingerprint(layer.base_matrix(), layer.loldu_pivots) == prints[n], n
    loldu.save_adapter(model, tmp_path / "a")
    ids, img = inputs()
    img = img.to(dtype)
    fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "a")
    tol = {} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)  # the rest of W: within a rounding
    for ya, yb in zip(model(ids, img), fresh(ids, img)):
        torch.testing.assert_close(ya, yb, **tol)
    # unload gives the base weights back: exactly where the factorization reads, elsewhere within the
    # two roundings of (W0 + ΔW) - ΔW.
    loldu.unload(model)
    eps = torch.finfo(dtype).eps
    for (n, m), (_, m0) in zip(model.named_modules(), base.named_modules()):
        if n in TARGETS:
            w, w0, wm = m.weight.detach().double(), m0.weight.double(), merged[n].double()
            assert ((w - w0).abs() <= eps * (wm.abs() + w0.abs())).all(), n


def test_unmerge_restores_a_channels_last_conv_exactly():
    base = _ChannelsLastConv()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=4, target_modules=["conv"]))
    perturb(model, scale=2.0)
    layer = model.conv
    cols, rows = _reads(layer)
    loldu.merge(model)
    loldu.unmerge(model)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    c2, r2 = _reads(layer)
    assert torch.equal(c2, cols) and torch.equal(r2, rows)


# -- adapter_ids with unbatched input ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_adapter_ids_refuses_unbatched_input(kind):
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(16, 8)), torch.randn(16)
    else:
        model, x = nn.Sequential(nn.Conv2d(3, 8, 3)), torch.randn(3, 7, 7)
    loldu.inject(model, LoLDUConfig(rank=2, target_modules=["0"]))
    loldu.add_adapter(model, "other")
    n = x.shape[0]
    with loldu.adapter_ids(model, ["default", "other"] * (n // 2) + ["other"] * (n % 2)):
        with pytest.raises(AdapterError, match=r"needs batched input \(batch dim 0\); layer '0' got shape"):
            model(x)
    with loldu.adapter_ids(model, ["other"]):  # the same input as a batch of one
        assert model(x.unsqueeze(0)).shape[0] == 1
