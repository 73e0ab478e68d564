"""The two exact forms of adapter_linear (docs/method.md §7): "delta" and "dense" agree in outputs
and gradients, pass gradcheck and opcheck (and so does "auto"), the chooser picks the form the cost
model says, per-row c runs delta, saved tensors are what each form needs, bad forms are refused;
a LoLDU layer runs its config's form (ahead of forced_form / LOLDU_ADAPTER_FORM, which only replace "auto")."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loldu
from loldu.reference import dense_weight_reference

FORMS = ["delta", "dense", "auto"]
OPS = torch.ops.loldu
COMPILED_ONLY = pytest.mark.skipif(loldu.build_info()["backend"] == "pytorch",
                                   reason="what the compiled op's autograd saves; the reference is autograd over aten ops")


def saved_by(fn):
    """The tensors autograd saves while fn() runs, and fn's result."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def make_layer(d, k, r, dtype=torch.float64, device="cpu", upper=True):
    """W0, b and LDU factors; upper=False scrambles U's zero triangle (the kernels must not rely on it)."""
    W = torch.randn(d, k, dtype=dtype, device=device) / k**0.5
    f = loldu.ops.ldu(W, r)
    U = f.U if upper else f.U + 0.1 * torch.randn_like(f.U)
    return W, torch.randn(d, dtype=dtype, device=device), f.PL.to(dtype), U.to(dtype)


# n = 6 and n = 300 at full rank make the dense backward take both evaluations of grad_c
# (through t and h, and through G = g^T x), the cost model choosing by n.
@pytest.mark.parametrize("d,k,r,n", [(40, 40, 40, 6), (40, 40, 40, 300), (50, 30, 12, 20), (24, 64, 24, 300)])
@pytest.mark.parametrize("upper", [True, False])
def test_forms_agree(d, k, r, n, upper, device):
    W, b, PL, U = make_layer(d, k, r, device=device, upper=upper)
    x = torch.randn(n, k, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(r, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(n, d, dtype=torch.float64, device=device)
    got = {}
    for form in FORMS:
        y = loldu.ops.adapter_linear(x, W, b, PL, U, c, form=form)
        got[form] = (y, *torch.autograd.grad(y, (x, c), g))
    # Different computations (the dense form rounds W = W0 + PL diag(c) U once and then sums over k;
    # the delta form sums x W0^T and (x U^T c) PL^T separately; grad_c sums over n rows or over d x k
    # entries of G): they agree to fp64 rounding, a few eps times the inner dimensions (<= 300) and
    # the magnitudes (O(1) to O(10) here): about 1e-12 at most; the bound leaves 100x margin.
    for form in ("dense", "auto"):
        for a, want in zip(got[form], got["delta"]):
            torch.testing.assert_close(a, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n", [3, 30])
def test_gradcheck_each_form(form, n, device):
    d, k, r = 12, 12, 12  # full rank: at n = 30 auto runs the dense form, at n = 3 the delta form
    assert loldu.ops.choose_form(n, d, k, r, torch.float64, device) == ("dense" if n == 30 else "delta")
    W, b, PL, U = make_layer(d, k, r, device=device)
    x = torch.randn(n, k, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(r, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: loldu.ops.adapter_linear(x, W, b, PL, U, c, form=form), (x, c))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_opcheck_each_form(form, lead, device):
    d, k, r = 24, 20, 20
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32, device=device)
    x = torch.randn(*lead, k, device=device, requires_grad=True)
    c = torch.randn(r, device=device, requires_grad=True)
    torch.library.opcheck(OPS.adapter_linear, (x, W, b, PL, U, c, form))
    if form != "auto":
        torch.library.opcheck(OPS.adapter_linear_forward, (x, W, b, PL, U, c, form))


@pytest.mark.parametrize("form", ["delta", "dense"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("with_saved", [False, True])
def test_opcheck_backward_each_form(form, need, with_saved, device):
    d, k, r, n = 24, 18, 18, 7
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32, device=device)
    x = torch.randn(n, k, device=device)
    g = torch.randn(n, d, device=device)
    c = torch.randn(r, device=device)
    saved = OPS.adapter_linear_forward(x, W, b, PL, U, c, form)[1] if with_saved else None
    torch.library.opcheck(OPS.adapter_linear_backward, (g, x, W, PL, U, c, *need, form, saved))


def test_backward_of_each_form_matches_autograd_of_the_dense_layer(device):
    d, k, r, n = 26, 19, 19, 40
    W, b, PL, U = make_layer(d, k, r, device=device)
    x = torch.randn(n, k, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(r, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(n, d, dtype=torch.float64, device=device)
    want = torch.autograd.grad(torch.nn.functional.linear(x, dense_weight_reference(W, PL, U, c), b), (x, c), g)
    for form in ("delta", "dense"):
        saved = OPS.adapter_linear_forward(x.detach(), W, b, PL, U, c.detach(), form)[1]
        for s in (None, saved):
            gx, gc = OPS.adapter_linear_backward(g, x.detach(), W, PL, U, c.detach(), True, True, form, s)
            # fp64, different summation orders: bound as in test_forms_agree.
            torch.testing.assert_close(gx, want[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(gc, want[1], rtol=1e-10, atol=1e-10)
        gx, gc = OPS.adapter_linear_backward(g, x.detach(), W, PL, U, c.detach(), False, True, form, saved)
        assert gx.numel() == 0 and gc.shape == c.shape
        gx, gc = OPS.adapter_linear_backward(g, x.detach(), W, PL, U, c.detach(), True, False, form, saved)
        assert gx.shape == x.shape and gc.numel() == 0


def test_chooser_picks_the_cheaper_form():
    """The cost model (not timing): full rank of a BERT-size layer is dense, a small rank of a
    large layer is delta; per-row c is always delta (it would need one W per row)."""
    assert loldu.ops.choose_form(2048, 768, 768, 768) == "dense"
    assert loldu.ops.choose_form(2048, 4096, 4096, 16) == "delta"
    assert loldu.ops.choose_form(8192, 768, 768, 768, torch.bfloat16) == "dense"
    assert loldu.ops.choose_form(8, 4096, 4096, 64) == "delta"
    m = loldu.ops.dense_min_rows(768, 768, 768)
    assert m is not None and loldu.ops.choose_form(m, 768, 768, 768) == "dense"
    assert loldu.ops.choose_form(m - 1, 768, 768, 768) == "delta"
    # The dense form's fixed cost (building W) is paid once per call: more rows favour it.
    for d, k, r in [(384, 1536, 64), (1024, 1024, 16), (768, 3072, 768)]:
        forms = [loldu.ops.choose_form(n, d, k, r) for n in (1, 8, 64, 512, 4096, 1 << 20)]
        assert forms == sorted(forms, key=lambda f: f == "dense"), (d, k, r, forms)


@pytest.mark.skipif(loldu.build_info()["backend"] == "pytorch", reason="compares the C++ cost model with Python's")
def test_cpp_and_python_cost_models_agree():
    mod = loldu._backend._MODULE
    never = 2**63 - 1
    for d, k in [(384, 384), (384, 1536), (768, 3072), (4096, 4096), (11008, 4096), (8, 2000)]:
        for r in sorted({1, 16, 64, 100, min(d, k)}):
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                for dev in ("cpu", "cuda"):
                    for need in [(True, True), (False, False), (True, False), (False, True)]:
                        py = loldu.ops.dense_min_rows(d, k, r, dtype, dev, need_grad_x=need[0], need_grad_c=need[1])
                        cpp = mod.dense_min_rows(d, k, r, str(dtype), dev, *need)
                        assert (never if py is None else py) == cpp, (d, k, r, dtype, dev, need)


@COMPILED_ONLY
def test_auto_follows_the_chooser_and_whether_a_backward_follows(device):
    """What auto ran shows in what the forward saves: t (n, r) for delta, W (d, k) for dense."""
    d, k, r = 96, 96, 96
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32, device=device)
    c = torch.randn(r, device=device, requires_grad=True)
    for n in (2, 4000):
        x = torch.randn(n, k, device=device, requires_grad=True)
        saved, _ = saved_by(lambda: loldu.ops.adapter_linear(x, W, b, PL, U, c))  # noqa: B023 - called at once
        want = loldu.ops.choose_form(n, d, k, r, torch.float32, device)
        assert any(tuple(t.shape) == ((d, k) if want == "dense" else (n, r)) for t in saved), (n, want)
    assert loldu.ops.choose_form(2, d, k, r, device=device) == "delta"
    assert loldu.ops.choose_form(4000, d, k, r, device=device) == "dense"


def test_per_row_coefficients_run_delta_in_every_form(device):
    d, k, r, n = 30, 26, 26, 500
    W, b, PL, U = make_layer(d, k, r, device=device)
    x = torch.randn(n, k, dtype=torch.float64, device=device)
    cs = torch.randn(n, r, dtype=torch.float64, device=device, requires_grad=True)
    ys = [loldu.ops.adapter_linear(x, W, b, PL, U, cs, form=f) for f in FORMS]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])  # the same (delta) computation
    x8, cs8 = x[:8], cs[:8].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda cs: loldu.ops.adapter_linear(x8, W, b, PL, U, cs, form="dense"), (cs8,))
    with pytest.raises(ValueError, match="dense form needs one c"):
        OPS.adapter_linear_forward(x, W, b, PL, U, cs.detach(), "dense")


@COMPILED_ONLY
def test_dense_form_saves_its_weight_and_the_delta_form_t():
    d, k, r, n = 64, 48, 16, 10
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32)
    x = torch.randn(n, k, requires_grad=True)
    c = torch.randn(r, requires_grad=True)
    for form, shape in (("delta", (n, r)), ("dense", (d, k))):
        saved, y = saved_by(lambda: loldu.ops.adapter_linear(x, W, b, PL, U, c, form=form))  # noqa: B023 - called at once
        y.sum().backward()
        extra = [t for t in saved if tuple(t.shape) == shape and t.data_ptr() != W.data_ptr()]
        assert len(extra) == 1, (form, [tuple(t.shape) for t in saved])
        if form == "dense":
            torch.testing.assert_close(extra[0], dense_weight_reference(W, PL, U, c.detach()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_zero_coefficients_give_the_base_layer_bit_for_bit_in_both_forms(transposed, device):
    """W0 + PL diag(0) U adds exact zeros, and W is laid out as W0 (a transposed W0, as transformers'
    Conv1D stores it, gives a transposed W), so x W^T is the very GEMM the base layer runs."""
    d, k, r = 48, 40, 40
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32, device=device)
    if transposed:
        W = W.t().contiguous().t()
    x = torch.randn(7, k, device=device)
    zero = torch.zeros(r, device=device)
    y, W_dense = OPS.adapter_linear_forward(x, W, b, PL, U, zero, "dense")
    assert torch.equal(W_dense, W) and W_dense.stride() == W.stride()
    base = torch.addmm(b, x, W.t())
    assert torch.equal(y, base)
    assert torch.equal(loldu.ops.adapter_linear(x, W, b, PL, U, zero, form="delta"), base)
    torch.library.opcheck(OPS.adapter_linear_forward, (x, W, b, PL, U, zero, "dense"))


def test_torch_compile_each_form():
    torch._dynamo.reset()
    d, k, r = 32, 24, 24
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32)
    c = torch.randn(r, requires_grad=True)
    for form in FORMS:
        def f(x, c, form=form):
            return torch.nn.functional.gelu(loldu.ops.adapter_linear(x, W, b, PL, U, c, form=form))

        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for n in (5, 900):  # dynamic rows: auto's choice is guarded as an inequality on n
            x = torch.randn(n, k, requires_grad=True)
            want = f(x, c)
            gw = torch.autograd.grad(want.sum(), (x, c))
            got = compiled(x, c)
            gg = torch.autograd.grad(got.sum(), (x, c))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for a, e in zip(gg, gw):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_bad_form_is_refused_by_name():
    d, k, r = 20, 12, 4
    W, b, PL, U = make_layer(d, k, r, dtype=torch.float32)
    x, c = torch.randn(3, k), torch.randn(r)
    with pytest.raises(loldu.ShapeError, match="form must be 'auto', 'delta' or 'dense', got 'sparse'"):
        loldu.ops.adapter_linear(x, W, b, PL, U, c, form="sparse")
    with pytest.raises(ValueError, match="got 'Dense'"):
        OPS.adapter_linear(x, W, b, PL, U, c, "Dense")
    with pytest.raises(ValueError, match="'auto' is resolved by"):
        OPS.adapter_linear_forward(x, W, b, PL, U, c, "auto")
    with pytest.raises(ValueError, match="got 'lowrank'"):
        OPS.adapter_linear_backward(torch.randn(3, d), x, W, PL, U, c, True, True, "lowrank")
    with pytest.raises(ValueError, match="saved must be"):
        OPS.adapter_linear_backward(torch.randn(3, d), x, W, PL, U, c, True, True, "dense", torch.randn(3, r))


# -- the config's form reaches the op (LoLDU layers) -------------------------------------------------
class _FormsSeen(TorchDispatchMode):
    """Records the form argument of every adapter_linear_forward call the dispatcher sees."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OPS.adapter_linear_forward.default:
            self.forms.append(args[6])
        return func(*args, **(kwargs or {}))


def _injected(form, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40, dtype=torch.float64), torch.nn.Tanh(),
                                Conv1D(16, 40).double())
    loldu.inject(model, loldu.LoLDUConfig(rank=16, target_modules=["0", "2"], form=form))
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            layer.loldu_z["default"].mul_(1.0 + 0.5 * torch.randn_like(layer.loldu_z["default"]))
    return model


def test_config_form_gives_the_same_model_in_delta_and_dense():
    x = torch.randn(9, 24, dtype=torch.float64)
    got = {}
    for form in ("delta", "dense"):
        model = _injected(form)
        xx = x.clone().requires_grad_(True)
        y = model(xx)
        g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        got[form] = (y, *torch.autograd.grad(y, [xx, *params], g))
    # Two computations of the same function (as in test_forms_agree): fp64, inner dimensions <= 40,
    # O(1) magnitudes: they agree to ~1e-14; 1e-10 leaves margin, a real difference is O(1).
    for a, b in zip(got["dense"], got["delta"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@COMPILED_ONLY
@pytest.mark.parametrize("form", ["delta", "dense"])
def test_config_form_reaches_the_op_and_beats_the_form_override(form):
    """A config's explicit form is what adapter_linear_forward runs, for nn.Linear and Conv1D, also
    when loldu.ops.forced_form (or LOLDU_ADAPTER_FORM) asks for the other form: that override only
    replaces form="auto". Seen through the dispatcher (the compiled op is a kernel of its own)."""
    other = "dense" if form == "delta" else "delta"
    x = torch.randn(9, 24, dtype=torch.float64)
    model = _injected(form)
    with _FormsSeen() as seen:
        model(x)
    assert seen.forms == [form, form]
    auto = _injected("auto")
    with loldu.ops.forced_form(other):
        with _FormsSeen() as seen:
            model(x)
        assert seen.forms == [form, form]
        with _FormsSeen() as seen:
            auto(x)
        assert seen.forms == [other, other]  # "auto" follows the override
        with loldu.ops.forced_form("auto"), _FormsSeen() as seen:
            auto(x)
        # n = 9 rows at r = 16: the cost model picks delta here.
        assert seen.forms == [loldu.ops.choose_form(9, 40, 24, 16, torch.float64, "cpu"),
                              loldu.ops.choose_form(9, 16, 40, 16, torch.float64, "cpu")] == ["delta", "delta"]
    with pytest.raises(loldu.ShapeError, match="form must be 'auto', 'delta' or 'dense', got 'sparse'"):
        with loldu.ops.forced_form("sparse"):
            pass


@COMPILED_ONLY
def test_forced_form_is_scoped_and_restored():
    d, k, r = 20, 12, 12
    W, b, PL, U = make_layer(d, k, r)
    x, c = torch.randn(3, k, dtype=torch.float64), torch.randn(r, dtype=torch.float64)

    def ran():
        with _FormsSeen() as seen:
            loldu.ops.adapter_linear(x, W, b, PL, U, c)
        return seen.forms[-1]

    default = ran()
    with pytest.raises(RuntimeError, match="inside"):
        with loldu.ops.forced_form("dense"):
            assert ran() == "dense"
            with loldu.ops.forced_form("delta"):
                assert ran() == "delta"
            assert ran() == "dense"
            raise RuntimeError("inside")
    assert ran() == default
