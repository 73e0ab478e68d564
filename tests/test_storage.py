"""factor_storage="cur" (docs/method.md §8): a layer keeps the two unit triangles L11, U11 (packed in
one r x r matrix) and the pivots instead of PL (d, r) and U (r, k), and computes the adapter branch from W0's pivot rows and
leading columns with two triangular solves. Same function as "full" storage up to rounding whose
size is bounded below; every layer kind, merge/unmerge, delta_weight, save/load, casts, and the
byte counts of docs/storage.md."""
import copy

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, c64, inputs, perturb
from torch.utils._python_dispatch import TorchDispatchMode

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.layer import factor_bytes

U32 = 2.0 ** -24  # fp32 unit roundoff


def _linear(W, b):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    return nn.Sequential(lin)


def _adapted(W, b, r, storage, c):
    """A one-Linear model injected at rank r with `storage`, its adapter set so that c (fp64) is
    what it computes (z = D + c / sigma0, rounded to fp32)."""
    model = loldu.inject(_linear(W, b), LoLDUConfig(rank=r, target_modules=["0"], factor_storage=storage))
    layer = model[0]
    with torch.no_grad():
        layer.loldu_z["default"].copy_(layer.loldu_D.double() + c / layer.sigma0["default"])
    layer.loldu_z["default"].requires_grad_(True)
    return model, layer


def _cond_inf(A):
    return float(torch.linalg.matrix_norm(A, float("inf")) * torch.linalg.matrix_norm(torch.linalg.inv(A), float("inf")))


def _check_cur_against_full(W, b, r, n=48):
    """Outputs and gradients (x, c) of "cur" and "full" storage in fp32 against a float64 oracle
    (factors of the same fp32 W0 from an fp64 factorization), each within the first-order bound

        |err| <= u (k B + K M),   K = kappa(L11) + kappa(U11) + k + d,

    entrywise, u = 2^-24, with B = |x| |W0|^T + |b| the base product's magnitude and
    M = ((|x| |U|^T) |c|) |PL|^T the adapter branch's (the same with g and the transposes for the
    gradients). Why: each GEMM commits at most (inner dim) u of the magnitudes it sums (k B, and k M
    or d M for the branch's products); a unit triangular solve with T = L11 or U11 has a forward
    error of at most kappa_inf(T) u relative to its solution (Higham, Accuracy and Stability, §8), and
    "full" storage pays the same kappas once, when the factorization forms PL and U by those solves.
    cur - full is then within twice the bound (both against the oracle). Measured ratios to the
    bound: at most 0.025 on MiniLM's weights at r = 16, 64 and full rank and on random ones."""
    d, k = W.shape
    f64 = loldu.ops.ldu(W.double(), r)
    PL, U = f64.PL, f64.U
    # c of the size training reaches (a fraction of D), so that the branch is not negligible.
    c = 0.5 * torch.randn(r, dtype=torch.float64) * f64.D.abs()
    x = torch.randn(n, k)
    g = torch.randn(n, d)
    got = {}
    for storage in ("full", "cur"):
        model, layer = _adapted(W, b, r, storage, c)
        assert torch.equal(layer.loldu_pivots, f64.pivots)  # same pivots in fp32 and fp64 here, else no oracle
        xx = x.clone().requires_grad_(True)
        y = model(xx)
        gx, gz = torch.autograd.grad(y, (xx, layer.loldu_z["default"]), g)
        got[storage] = (y.detach().double(), gx.double(), gz.double() / layer.sigma0["default"])
        c_used = layer.coefficients("default").detach().double()
    x64, g64, W64 = x.double(), g.double(), W.double()
    b64 = torch.zeros(d, dtype=torch.float64) if b is None else b.double()
    t, h = x64 @ U.T, g64 @ PL
    want = (x64 @ W64.T + b64 + (t * c_used) @ PL.T, g64 @ W64 + (h * c_used) @ U, (t * h).sum(0))
    K = _cond_inf(PL[f64.pivots]) + _cond_inf(U[:, :r]) + k + d
    ax, ag, aU, aPL, aW = x64.abs(), g64.abs(), U.abs(), PL.abs(), W64.abs()
    ac = c_used.abs()
    bounds = (U32 * (k * (ax @ aW.T + b64.abs()) + K * ((ax @ aU.T) * ac) @ aPL.T),
              U32 * (d * (ag @ aW) + K * ((ag @ aPL) * ac) @ aU),
              U32 * (K + n) * ((ax @ aU.T) * (ag @ aPL)).sum(0))
    branch = ((t * c_used) @ PL.T).abs().max()
    for what, want_i, bound, cur, full in zip(("y", "grad x", "grad c"), want, bounds, got["cur"], got["full"]):
        assert bool(((cur - want_i).abs() <= bound).all()), (what, float(((cur - want_i).abs() / bound).max()))
        assert bool(((full - want_i).abs() <= bound).all()), (what, float(((full - want_i).abs() / bound).max()))
        assert bool(((cur - full).abs() <= 2 * bound).all()), what
    # The entrywise majorant M overstates the branch where PL U cancels (at full rank on real weights it
    # reaches a third of max |branch|), so the outputs are also held to the normwise form of the same
    # estimate, u (K max|branch| + k max B): relative to the branch, u K is at most 4.4e-3 (MiniLM at
    # full rank, kappas 2e4 and 5e4; measured 4e-5) and 1.2e-4 at r = 16, while a wrong triangle, a
    # missing D^-1 or a transposed solve changes y by O(branch).
    normwise = U32 * (K * float(branch) + k * float((ax @ aW.T + b64.abs()).max()))
    assert U32 * K < 5e-3
    for storage in ("cur", "full"):
        assert float((got[storage][0] - want[0]).abs().max()) <= normwise, storage


@pytest.fixture(scope="module")
def minilm_weights(minilm_path):
    from safetensors.torch import load_file

    sd = load_file(str(minilm_path / "model.safetensors"))
    out = {}
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
                 "encoder.layer.5.output.dense"):
        key = next(k for k in sd if k.endswith(name + ".weight"))
        out[name] = (sd[key].float().contiguous(), sd[key[:-len("weight")] + "bias"].float().contiguous())
    return out


@pytest.mark.parametrize("name", ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
                                  "encoder.layer.5.output.dense"])
@pytest.mark.parametrize("rank", ["16", "64", "full"])
def test_cur_matches_full_on_minilm_weights(minilm_weights, name, rank):
    W, b = minilm_weights[name]
    _check_cur_against_full(W, b, min(W.shape) if rank == "full" else int(rank))


@pytest.mark.parametrize("d,k,r", [(96, 80, 8), (96, 80, 80), (40, 120, 40), (130, 64, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_cur_matches_full_on_random_weights(d, k, r, bias):
    W = torch.randn(d, k) / k ** 0.5
    _check_cur_against_full(W, torch.randn(d) if bias else None, r)


def _tiny(storage, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = loldu.inject(TinyNet().to(dtype), LoLDUConfig(rank=3, target_modules=TARGETS, factor_storage=storage))
    torch.manual_seed(seed + 1)
    perturb(model, sigma=True)
    return model


def test_every_kind_computes_the_same_under_cur_storage():
    """Embedding, Linear, Conv1D and Conv2d in fp64: cur and full agree in outputs and z gradients.
    Both are exact in exact arithmetic; in fp64 (u = 1.1e-16), with inner dimensions <= 32, r = 3
    (kappa(L11), kappa(U11) < 100 here) and O(1) magnitudes, they differ by < 1e-13: 1e-10 leaves
    1000x margin while any real mistake is O(1)."""
    full, cur = _tiny("full"), _tiny("cur")
    for (_, a), (_, b) in zip(loldu.adapted_layers(full), loldu.adapted_layers(cur)):
        assert b.storage == "cur" and torch.equal(a.loldu_z["default"], b.loldu_z["default"])
        assert _cond_inf(a.loldu_PL[a.loldu_pivots].double()) < 100 and _cond_inf(a.loldu_U[:, :3].double()) < 100
    ids, img = inputs()
    img = img.double()
    outs = []
    for model in (full, cur):
        model.train()
        ys = model(ids, img)
        gen = torch.Generator().manual_seed(7)
        loss = sum((y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum() for y in ys)
        params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
        outs.append((ys, torch.autograd.grad(loss, params)))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert len(outs[0][1]) == len(TARGETS)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert a.abs().max() > 1e-3  # the adapter does get a gradient
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cur_per_row_adapters_and_unbatched_conv():
    """adapter_ids (per-row c) under cur equals running each row's adapter alone (fp64, bound as above)."""
    model = _tiny("cur")
    loldu.add_adapter(model, "other")
    perturb(model, adapter="other")
    ids, img = inputs(batch=2)
    img = img.double()
    with loldu.adapter_ids(model, ["default", "other"]):
        mixed = model(ids, img)
    for row, name in enumerate(["default", "other"]):
        loldu.set_adapter(model, name)
        alone = model(ids[row:row + 1], img[row:row + 1])
        for a, b in zip(mixed, alone):
            torch.testing.assert_close(a[row:row + 1], b, rtol=1e-10, atol=1e-10)
    conv = dict(loldu.adapted_layers(model))["conv"]
    torch.testing.assert_close(conv(img[0]), conv(img[:1])[0], rtol=1e-10, atol=1e-10)


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns that does not share another's storage."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and not any(a.alias_info for a in func._schema.returns):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
        return out


def test_cur_forward_and_backward_never_form_pl_u_or_a_dense_matrix():
    d, k, r, n = 72, 56, 12, 5  # n d < r k < d r < d k: any PL-, U- or W-sized result stands out
    W = torch.randn(d, k) / k ** 0.5
    model, layer = _adapted(W, torch.randn(d), r, "cur", torch.randn(r, dtype=torch.float64))
    x = torch.randn(n, k, requires_grad=True)
    with _Allocations() as seen:
        model(x).square().sum().backward()
    assert x.grad is not None and layer.loldu_z["default"].grad.abs().max() > 0
    too_big = [s for s in seen.shapes if torch.Size(s).numel() >= r * k]
    assert not too_big, too_big
    # The same count for full storage does see PL and U products of that size (the check can fail).
    model_full, _ = _adapted(W, torch.randn(d), r, "full", torch.randn(r, dtype=torch.float64))
    assert {tuple(b.shape) for b in model_full.buffers()} >= {(d, r), (r, k)}


def test_cur_buffers_are_the_triangles_and_factor_bytes_counts_them():
    for storage in ("full", "cur"):
        for dtype in (torch.float32, torch.float64):
            model = _tiny(storage, dtype)
            for name, layer in loldu.adapted_layers(model):
                d, k = layer.base_matrix().shape
                keys = {n for n, _ in layer.named_buffers(recurse=False)}
                if storage == "cur":
                    assert keys == {"loldu_LU11", "loldu_D", "loldu_pivots"}, name
                    assert bool((layer.loldu_LU11.diagonal() == 1).all())
                else:
                    assert keys == {"loldu_PL", "loldu_U", "loldu_D", "loldu_pivots"}, name
                assert layer.stored_factor_bytes() == factor_bytes(d, k, 3, storage, dtype), (name, storage)
            assert not any("loldu_" in key and "loldu_z" not in key and "loldu_sigma" not in key
                           for key in model.state_dict())
    # The triangles are the pivot rows of PL and the leading columns of U.
    full, cur = _tiny("full", torch.float64), _tiny("cur", torch.float64)
    for (_, a), (_, b) in zip(loldu.adapted_layers(full), loldu.adapted_layers(cur)):
        # Below the diagonal: PL's pivot rows; above it: U's leading columns (both unit triangular).
        torch.testing.assert_close(b.loldu_LU11.tril(-1), a.loldu_PL[a.loldu_pivots].tril(-1), rtol=0, atol=1e-15)
        torch.testing.assert_close(b.loldu_LU11.triu(1), a.loldu_U[:, :3].triu(1), rtol=0, atol=1e-15)
        torch.testing.assert_close(a.loldu_PL[a.loldu_pivots].triu(1), torch.zeros(3, 3, dtype=torch.float64))
        PL, U = b.full_factors()
        torch.testing.assert_close(PL, a.loldu_PL, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(U, a.loldu_U, rtol=1e-12, atol=1e-12)


def test_factor_bytes_table_values():
    # full: (d r + r k) fp32 + D fp32 + pivots int64; cur: r^2 fp32 + D + pivots;
    # the paper's implementation: P (d, d) + L (d, r) + U (r, k) + D.
    assert factor_bytes(768, 768, 16) == (768 * 16 * 2) * 4 + 16 * 4 + 16 * 8
    assert factor_bytes(768, 768, 16, "cur") == 16 * 16 * 4 + 16 * 4 + 16 * 8
    assert factor_bytes(768, 3072, 64, "reference") == (768 * 768 + 768 * 64 + 64 * 3072) * 4 + 64 * 4
    assert factor_bytes(4096, 4096, 4096, "cur") < 0.51 * factor_bytes(4096, 4096, 4096, "full")
    # lu (full rank): the LU takes W0's place; perm (d,) and the pivots int64 + D fp32 beside it.
    assert factor_bytes(3072, 768, 768, "lu") == 8 * (3072 + 768) + 768 * 4
    with pytest.raises(AdapterError, match="storage must be"):
        factor_bytes(8, 8, 2, "sparse")
    with pytest.raises(AdapterError, match="rank 9 out of range"):
        factor_bytes(8, 8, 9)


def test_cur_merge_unmerge_and_delta_weight():
    full, cur = _tiny("full"), _tiny("cur")
    ids, img = inputs()
    img = img.double()
    before = cur(ids, img)
    for (_, a), (_, b) in zip(loldu.adapted_layers(full), loldu.adapted_layers(cur)):
        # fp64, r = 3: as in test_every_kind_computes_the_same_under_cur_storage.
        torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=1e-10, atol=1e-10)
        dW = a.loldu_PL.double() @ torch.diag(c64(a, "default")) @ a.loldu_U.double()
        torch.testing.assert_close(b.delta_weight(), dW, rtol=1e-10, atol=1e-10)
    reads = {n: (l.base_matrix()[:, :3].clone(), l.base_matrix()[l.loldu_pivots].clone())
             for n, l in loldu.adapted_layers(cur)}
    loldu.merge(cur)
    merged = cur(ids, img)
    for a, b in zip(before, merged):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for (_, a), (_, b) in zip(loldu.adapted_layers(full), loldu.adapted_layers(cur)):
        # delta_weight of a merged layer still uses W0's reads (remembered by merge), not W0 + ΔW.
        torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=1e-10, atol=1e-10)
    loldu.unmerge(cur)
    for n, layer in loldu.adapted_layers(cur):
        assert torch.equal(layer.base_matrix()[:, :3], reads[n][0])
        assert torch.equal(layer.base_matrix()[layer.loldu_pivots], reads[n][1])
    for a, b in zip(before, cur(ids, img)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cur_save_load_round_trip(tmp_path):
    model = _tiny("cur", torch.float32)
    base = copy.deepcopy(model)
    loldu.unload(base)
    loldu.save_adapter(model, tmp_path / "a")
    fresh = loldu.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert {layer.storage for _, layer in loldu.adapted_layers(fresh)} == {"cur"}
    ids, img = inputs()
    for a, b in zip(model(ids, img), fresh(ids, img)):
        assert torch.equal(a, b)  # the same W0, pivots and z: the same computation


def test_cur_at_init_is_the_base_model_and_casts_keep_the_triangles_sane():
    torch.manual_seed(0)
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS, factor_storage="cur"))
    ids, img = inputs()
    for a, b in zip(base(ids, img), model(ids, img)):
        assert torch.equal(a, b)  # c == 0: the branch adds exact zeros to the base layers' own outputs
    model.half()
    base.half()
    for _, layer in loldu.adapted_layers(model):
        assert layer.loldu_LU11.dtype == torch.float16 and layer.loldu_D.dtype == torch.float16
    for a, b in zip(base(ids, img.half()), model(ids, img.half())):
        assert torch.equal(a, b)
    model.double()
    for _, layer in loldu.adapted_layers(model):
        assert layer.loldu_LU11.dtype == torch.float64


def test_cur_triangles_fp16_cannot_hold_stay_fp32():
    """U11[0, 1] = W[I0, 1] / W[I0, 0]: a leading column 1e4 times smaller than the next makes it
    >= 5e3 > 65504 / 256, so a cast to fp16 keeps the triangles in fp32 (and the outputs finite).
    (Column 0 stays far above the pivot tolerance d eps max|W|, whatever the random draw.)"""
    W = torch.randn(8, 8, dtype=torch.float64)
    W[:, 0] = torch.linspace(1, 2, 8, dtype=torch.float64) * 1e-1
    W[:, 1] = (1 + torch.rand(8, dtype=torch.float64)) * 1e3
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(W)
    model = loldu.inject(nn.Sequential(lin), LoLDUConfig(rank=2, target_modules=["0"], factor_storage="cur"))
    layer = model[0]
    assert layer.store.peak > torch.finfo(torch.float16).max / 256
    model.half()
    assert layer.loldu_LU11.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.float16
    perturb(model)
    assert torch.isfinite(model(torch.randn(3, 8, dtype=torch.float16))).all()


def test_second_adapter_with_another_storage_is_refused_unchanged():
    model = _tiny("cur")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="factor_storage='full'.*'cur'"):
        loldu.add_adapter(model, "b", LoLDUConfig(rank=3, target_modules=TARGETS))
    assert loldu.adapter_names(model) == ["default"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cur_load_state_dict_of_a_new_base_rederives_the_triangles():
    a, b = _tiny("cur", seed=0), _tiny("cur", seed=10)
    b.load_state_dict(a.state_dict())
    for (_, la), (_, lb) in zip(loldu.adapted_layers(a), loldu.adapted_layers(b)):
        for key in ("loldu_LU11", "loldu_D", "loldu_pivots"):
            assert torch.equal(getattr(la, key), getattr(lb, key)), key
    ids, img = inputs()
    for ya, yb in zip(a(ids, img.double()), b(ids, img.double())):
        assert torch.equal(ya, yb)
