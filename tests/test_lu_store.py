"""factor_storage="lu" (docs/storage.md): at full rank r = min(d, k) a Linear-like layer keeps the
packed LU of W0 in place of W0 (the same weight Parameter) and computes W(c)[perm] = L diag(D + c) Ũ
through loldu.ops.lu_linear. Checked against float64 oracles built from torch.linalg.lu (not from
loldu's factorization), gradcheck, the stated init bound, merge/unmerge/disabled/unload, several
adapters, save/load, state_dict, ONNX export, rectangular shapes, fp16/bf16 bases, memory, refusals."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.layer import factor_bytes

U32 = 2.0 ** -24  # fp32 unit roundoff
SHAPES = [(24, 24), (16, 40), (40, 16)]


def _model(d, k, dtype=torch.float32, bias=True, conv1d=False):
    lin = Conv1D(d, k) if conv1d else nn.Linear(k, d, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn_like(lin.weight) / k ** 0.5)
        if lin.bias is not None:
            lin.bias.copy_(torch.randn_like(lin.bias))
    return nn.Sequential(lin.to(dtype))


def _inject(base, adapter="default", storage="lu", **kw):
    d, k = loldu.layer.weight_matrix(base[0]).shape
    config = LoLDUConfig(rank=min(d, k), target_modules=["0"], factor_storage=storage, **kw)
    return loldu.inject(copy.deepcopy(base), config, adapter)


def _set_c(layer, name, scale=0.3):
    """Moves adapter `name` away from c == 0 by a fresh random step (a fraction of D)."""
    with torch.no_grad():
        D = layer.loldu_D
        layer.loldu_z[name].copy_(D + scale * torch.randn_like(D) * D.abs() / layer.sigma0[name])
    return layer.coefficients(name).detach()


def _oracle_weight(W0, c, pivots=None):
    """W(c) = P L diag(D + c) Ũ in float64 from torch.linalg.lu of W0 (c in the pivot order, as D). With
    the layer's `pivots` (fp64 and fp32 partial pivoting may break a near tie differently on large
    weights): the dense formula W0 + PL diag(c) U with fp64 factors derived from those pivots."""
    if pivots is not None:
        f = loldu.ops.ldu_from_pivots(W0.double(), pivots)
        return W0.double() + (f.PL * c.double()) @ f.U
    P, L, U = torch.linalg.lu(W0.double())
    D = U.diagonal()
    return P @ (L * ((D + c.double()) / D)) @ U


def _bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@pytest.mark.parametrize("d,k", SHAPES)
def test_fp64_outputs_and_gradients_match_the_dense_formula(d, k):
    base = _model(d, k, torch.float64)
    model = _inject(base)
    layer = model[0]
    assert layer.storage == "lu" and layer.rank == min(d, k)
    c = _set_c(layer, "default")
    W = _oracle_weight(base[0].weight, c)
    x = torch.randn(7, 3, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 3, d, dtype=torch.float64)
    y = model(x)
    gx, gz = torch.autograd.grad(y, (x, layer.loldu_z["default"]), g)
    # The oracle: the same function of x and c, differentiated by autograd through torch.linalg.lu's factors.
    c_leaf = c.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2 @ _oracle_weight(base[0].weight, c_leaf).T + base[0].bias
    gx2, gc2 = torch.autograd.grad(y2, (x2, c_leaf), g)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gz / layer.sigma0["default"], gc2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(W, base[0].weight + layer.delta_weight(), rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_layer():
    base = _model(9, 6, torch.float64)
    layer = _inject(base)[0]
    _set_c(layer, "default")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    c = layer.coefficients("default").detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, c: layer.adapted(x, c), (x, c))


@pytest.mark.parametrize("d,k", [(768, 768), (768, 3072), (3072, 768)])
def test_init_is_the_base_within_the_stated_bound(d, k):
    """At c == 0, |y - (x W0^T + b)| <= u (3m + k) ((|x| |DŨ|^T) |L|^T)[:, perm^-1] entrywise (LU backward
    error, Higham Thm 9.3, plus the two products'), and, as docs/storage.md states it, <= 1e-4 max |y|
    in fp32 (measured 1.2e-5 at 768 x 768, 1.6e-5 and 1.0e-5 for the rectangular shapes)."""
    base = _model(d, k)
    layer = _inject(base)[0]
    x = torch.randn(32, k)
    with torch.no_grad():
        y = layer(x).double()
    want = x.double() @ base[0].weight.double().T + base[0].bias.double()
    err = (y - want).abs()
    LU, m = layer.base_matrix().double(), min(d, k)
    L, Up = LU[:, :m].tril(-1) + torch.eye(d, m, dtype=torch.float64), LU[:m].triu()
    bound = U32 * (3 * m + k) * ((x.double().abs() @ Up.abs().T) @ L.abs().T)[:, torch.argsort(layer.loldu_perm)]
    assert bool((err <= bound).all())
    assert float(err.max()) <= 1e-4 * float(want.abs().max())
    assert float(err.max()) > 0  # not bit for bit: the LU's rounding shows


def test_merge_unmerge_disabled_and_merge_and_unload():
    base = _model(20, 12)
    model = _inject(base)
    layer = model[0]
    c = _set_c(layer, "default")
    lu_before = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = model(x)
        want = x.double() @ _oracle_weight(base[0].weight, c).T + base[0].bias.double()
        assert float((y.double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
        with loldu.disabled(model):
            y0 = model(x)
        assert float((y0 - base(x)).abs().max()) <= 1e-4 * float(base(x).abs().max())
        planned = layer.merged_matrix("default")  # what merge writes, before writing it
        loldu.merge(model)
        w = layer.base_layer.weight
        assert torch.equal(planned, w)
        torch.testing.assert_close(w.double(), _oracle_weight(base[0].weight, c), rtol=0, atol=1e-5)
        assert not layer.base_layer._forward_pre_hooks  # a plain merged layer: its own forward runs
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-4 * float(y.abs().max()))
        loldu.unmerge(model)
        assert torch.equal(layer.base_layer.weight, lu_before)  # the LU form back, exactly
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    plain = loldu.merge_and_unload(model)
    assert isinstance(plain[0], nn.Linear) and not plain[0]._forward_pre_hooks
    torch.testing.assert_close(plain[0].weight.double(), _oracle_weight(base[0].weight, c), rtol=0, atol=1e-5)


def test_unload_gives_w0_back_within_the_lus_rounding():
    base = _model(20, 12)
    model = _inject(base)
    _set_c(model[0], "default")
    plain = loldu.unload(model)
    assert isinstance(plain[0], nn.Linear) and not plain[0]._forward_pre_hooks
    torch.testing.assert_close(plain[0].weight, base[0].weight, rtol=0, atol=1e-4 * float(base[0].weight.abs().max()))
    x = torch.randn(3, 12)
    torch.testing.assert_close(plain(x), base(x), rtol=0, atol=1e-5)


def test_the_base_module_refuses_to_run_on_the_lu():
    model = _inject(_model(8, 8))
    with pytest.raises(AdapterError, match=r"layer '0'.*packed LU"):
        model[0].base_layer(torch.randn(2, 8))
    # restore_base (what unload runs) gives W0 back and the module runs again.
    model[0].restore_base()
    model[0].base_layer(torch.randn(2, 8))


def test_several_adapters_share_one_lu_and_mix_per_row():
    base = _model(16, 10)
    model = _inject(base, "a")
    loldu.add_adapter(model, "b")
    layer = model[0]
    ca, cb = _set_c(layer, "a"), _set_c(layer, "b")
    assert layer.base_layer.weight.shape == (16, 10) and layer.stored_factor_bytes() == factor_bytes(16, 10, 10, "lu")
    x = torch.randn(4, 10)
    outs = {}
    for name, c in (("a", ca), ("b", cb)):
        loldu.set_adapter(model, name)
        with torch.no_grad():
            outs[name] = model(x)
        want = x.double() @ _oracle_weight(base[0].weight, c).T + base[0].bias.double()
        assert float((outs[name].double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
    with loldu.adapter_ids(model, ["a", "b", None, "a"]), torch.no_grad():
        mixed = model(x)
    tol = 1e-4 * float(mixed.abs().max())
    torch.testing.assert_close(mixed[[0, 3]], outs["a"][[0, 3]], rtol=0, atol=tol)
    torch.testing.assert_close(mixed[1], outs["b"][1], rtol=0, atol=tol)
    torch.testing.assert_close(mixed[2], base(x)[2], rtol=0, atol=tol)


def test_save_load_onto_a_plain_model_and_the_file_fits_other_storages(tmp_path):
    base = _model(12, 12)
    model = _inject(base)
    _set_c(model[0], "default")
    loldu.save_adapter(model, tmp_path / "lu")
    full = _inject(base, storage="full")
    full[0].loldu_z["default"].data.copy_(model[0].loldu_z["default"])
    loldu.save_adapter(full, tmp_path / "full")
    _, _, t_lu = loldu.adapter_io.read_adapter(tmp_path / "lu")
    _, _, t_full = loldu.adapter_io.read_adapter(tmp_path / "full")
    for key in ("z", "sigma", "pivots", "fingerprint"):  # the file does not depend on the storage
        assert torch.equal(t_lu[key], t_full[key]), key
    x = torch.randn(6, 12)
    loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path / "lu")
    assert loaded[0].storage == "lu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loldu.load_adapter(copy.deepcopy(base), tmp_path / "full")(x), model(x),
                                   rtol=0, atol=1e-4 * float(model(x).abs().max()))
    loldu.load_adapter(model, tmp_path / "lu", "again")  # onto the lu model itself: same base
    other = _model(12, 12)
    with pytest.raises(AdapterError, match="fingerprint"):
        loldu.load_adapter(other, tmp_path / "lu")


def test_state_dict_holds_the_lu_and_loads_w0_or_the_same_lu():
    base = _model(10, 14)
    model = _inject(base)
    layer = model[0]
    _set_c(layer, "default")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(sd["0.base_layer.weight"], layer.base_matrix()) and "0.loldu_perm" in sd
    model.load_state_dict(sd)  # its own state_dict: nothing to re-derive
    # A state_dict with W0 (a 'full' model of the same base) is factorized again, to the same LU.
    lu_before = layer.base_matrix().clone()
    full = _inject(base, storage="full")
    model.load_state_dict(full.state_dict(), strict=False)
    torch.testing.assert_close(layer.base_matrix(), lu_before, rtol=0, atol=0)
    assert layer.storage == "lu" and layer.base_fingerprint() == full[0].base_fingerprint()
    # W0 of another base: the layer now holds that base's LU.
    other = _model(10, 14)
    model.load_state_dict(_inject(other, storage="full").state_dict(), strict=False)
    with torch.no_grad(), loldu.disabled(model):
        x = torch.randn(3, 14)
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=1e-4 * float(other(x).abs().max()))
    # Refused, nothing loaded: an lu state_dict into a 'full' layer, or another base's LU.
    before = {k: v.clone() for k, v in full.state_dict().items()}
    with pytest.raises(AdapterError, match="packed LU"):
        full.load_state_dict(sd)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())
    with pytest.raises(AdapterError, match="another packed LU"):
        model.load_state_dict(sd)


@pytest.mark.parametrize("d,k", [(768, 3072), (3072, 768)])
def test_rectangular_fp32_against_float64(d, k):
    base = _model(d, k)
    layer = _inject(base)[0]
    c = _set_c(layer, "default")
    x = torch.randn(16, k)
    with torch.no_grad():
        y = layer(x).double()
    want = x.double() @ _oracle_weight(base[0].weight, c, layer.loldu_pivots).T + base[0].bias.double()
    # Away from c == 0 the scaled L (by 1 + c / D) adds its own rounding: typically 3e-5 of max |y| in
    # fp32 here, 1.6e-4 in the worst of the seeds seen.
    assert float((y - want).abs().max()) <= 5e-4 * float(want.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_bases(dtype, tol):
    """fp16/bf16 bases keep their LU in their dtype when it holds it: outputs in the base's dtype,
    within a few roundings of that dtype of the float64 oracle (relative to max |y|)."""
    base = _model(32, 24, dtype)
    model = _inject(base)
    layer = model[0]
    assert layer.base_layer.weight.dtype == dtype and layer.base_dtype == dtype
    c = _set_c(layer, "default")
    x = torch.randn(8, 24).to(dtype)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == dtype
    want = x.double() @ _oracle_weight(base[0].weight, c).T + base[0].bias.double()
    assert float((y.double() - want).abs().max()) <= tol * float(want.abs().max())


def test_fp16_lu_that_fp16_cannot_hold_stays_fp32():
    base = _model(16, 16, torch.float16)
    with torch.no_grad():
        base[0].weight.mul_(1000)  # |DŨ| beyond fp16's max / 256
    with pytest.warns(RuntimeWarning, match="stored in float32"):
        model = _inject(base)
    layer = model[0]
    assert layer.base_layer.weight.dtype == torch.float32 and layer.base_dtype == torch.float16
    x = torch.randn(4, 16, dtype=torch.float16)
    with torch.no_grad():
        y = model(x)
        assert y.dtype == torch.float16
        model.half()  # a cast keeps the LU in fp32
        assert layer.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        model.float()
        assert layer.base_dtype == torch.float32 and model(x.float()).dtype == torch.float32


def test_conv1d_keeps_its_lu_transposed():
    base = _model(12, 20, conv1d=True)
    model = _inject(base)
    layer = model[0]
    assert layer.base_layer.weight.shape == (20, 12)
    c = _set_c(layer, "default")
    x = torch.randn(3, 20)
    with torch.no_grad():
        want = x.double() @ _oracle_weight(base[0].weight.t(), c).T + base[0].bias.double()
        assert float((model(x).double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
        loldu.merge(model)
        assert float((model(x).double() - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_memory_of_a_full_rank_lu_layer_is_the_base_layers():
    base = _model(768, 768)
    model = _inject(base)
    assert _bytes(model[0]) <= 1.05 * _bytes(base[0])
    full = _inject(base, storage="full")
    assert _bytes(full[0]) > 2.9 * _bytes(base[0])  # W0, PL and U


def test_refusals_leave_the_model_unchanged():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(8, 8)  # rank 6: full for a, not for b

        def forward(self, x):
            return self.b(self.a(x))

    model = Two()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"layer 'b'.*full rank: rank must be min\(d, k\) = 8.*\(8, 8\)"):
        loldu.inject(model, LoLDUConfig(rank=6, target_modules=["a", "b"], factor_storage="lu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.a._forward_pre_hooks and isinstance(model.a, nn.Linear)
    for module in (nn.Embedding(8, 6), nn.Conv2d(3, 4, 2)):
        with pytest.raises(AdapterError, match="only nn.Linear and transformers Conv1D"):
            loldu.inject(nn.Sequential(module), LoLDUConfig(rank=4, target_modules=["0"], factor_storage="lu"))
    with pytest.raises(AdapterError, match="full rank only"):
        factor_bytes(8, 8, 4, "lu")


def test_factor_bytes_counts_the_buffers():
    for d, k in SHAPES:
        for dtype in (torch.float32, torch.float64):
            layer = _inject(_model(d, k, dtype))[0]
            m = min(d, k)
            assert layer.stored_factor_bytes() == factor_bytes(d, k, m, "lu", dtype) == 8 * (d + m) + m * (
                8 if dtype == torch.float64 else 4)
            assert {n for n, _ in layer.named_buffers(recurse=False)} == {"loldu_perm", "loldu_D", "loldu_pivots"}


def _exportable():
    pytest.importorskip("onnxruntime")
    lx = pytest.importorskip("loldu.export")
    model = _inject(_model(16, 12).eval()).eval()
    _set_c(model[0], "default")
    x = torch.randn(4, 12)
    with torch.no_grad():
        return lx, model, x, model(x).numpy()


def test_onnx_export_merged_and_unmerged(tmp_path):
    """ONNX Runtime against the PyTorch lu layer: merged (W(c) formed from the LU) and unmerged (the
    exporter's copy re-stored as "full": W0 = P L D Ũ back, exact factors of the LU)."""
    lx, model, x, want = _exportable()
    for merge in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = lx.to_onnx(model, (x,), tmp_path / f"m{merge}.onnx", merge=merge)
        got = next(iter(lx.OrtRunner(rep.path, provider="cpu").run((x,)).values()))
        assert abs(got - want).max() <= 1e-4 * abs(want).max(), merge
    assert model[0].storage == "lu" and model[0].merged_adapter is None  # the export worked on a copy


def test_onnx_adapter_inputs_take_an_lu_layers_adapter_file(tmp_path):
    lx, model, x, want = _exportable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = lx.to_onnx(model, (x,), tmp_path / "c.onnx", merge=False, adapter_inputs=True)
    loldu.save_adapter(model, tmp_path / "ad")
    feeds = lx.adapter_feeds(tmp_path / "ad", rep.path)  # the export recorded W0's fingerprint
    got = lx.OrtRunner(rep.path, provider="cpu").run((x,), adapter=feeds)
    assert abs(next(iter(got.values())) - want).max() <= 1e-4 * abs(want).max()


def test_use_storage_round_trip_and_a_second_storage_refused():
    base = _model(14, 14)
    model = _inject(base, storage="full")
    layer = model[0]
    c = _set_c(layer, "default")
    x = torch.randn(5, 14)
    with torch.no_grad():
        y = model(x)
        layer.use_storage("lu")  # W0 factorized again from the pivots, the LU installed in the weight
        assert layer.storage == "lu" and len(layer.base_layer._forward_pre_hooks) == 1  # the guard
        tol = 1e-4 * float(y.abs().max())
        torch.testing.assert_close(model(x), y, rtol=0, atol=tol)
        layer.use_storage("full")
        torch.testing.assert_close(model(x), y, rtol=0, atol=tol)
        torch.testing.assert_close(layer.coefficients("default"), c, rtol=0, atol=0)
    with pytest.raises(AdapterError, match="factor_storage='lu' differs from the injected layers' 'full'"):
        loldu.add_adapter(model, "other", LoLDUConfig(rank=14, target_modules=["0"], factor_storage="lu"))
    low = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=4, target_modules=["0"]))
    with pytest.raises(AdapterError, match=r"layer '0'.*rank must be min\(d, k\) = 14"):
        low[0].use_storage("lu")
    assert low[0].storage == "full"
