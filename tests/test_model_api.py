"""The model-editing API: inject, forward, merge/unload, disabled, named and mixed adapters."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _model_helpers import (
    TARGETS,
    TinyNet,
    assert_same_snapshot,
    c64,
    dense_weights,
    inputs,
    oracle_forward,
    perturb,
    snapshot,
)

import loldu
from loldu import AdapterError, LoLDUConfig


def injected(rank=3, **kw):
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=rank, target_modules=TARGETS, **kw))
    return base, model


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def assert_close_ulps(a, b, ulps):
    """max |a - b| <= ulps * eps(b.dtype) * max |b|: equal up to a few roundings at the output's scale."""
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    tol = ulps * torch.finfo(b.dtype).eps * b.detach().double().abs().max().item()
    assert err <= tol, (err, tol)


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, word", [
    (dict(rank=0, target_modules=["fc1"]), "rank"),
    (dict(rank=2.0, target_modules=["fc1"]), "rank"),
    (dict(rank=2), "target_modules"),
    (dict(rank=2, target_modules=[]), "target_modules"),
    (dict(rank=2, target_modules="fc(1"), "regular expression"),
    (dict(rank=2, target_modules=["fc1"], pivoting="full"), "pivoting"),
    (dict(rank=2, target_modules=["fc1"], factor_dtype="int8"), "factor_dtype"),
    (dict(rank=2, target_modules=["fc1"], alpha=float("nan")), "alpha"),
    (dict(rank=2, target_modules=["fc1"], train_scale="yes"), "train_scale"),
])
def test_model_config_validated(kw, word):
    with pytest.raises(AdapterError, match=word):
        LoLDUConfig(**kw)


def test_model_config_matching_and_round_trip():
    c = LoLDUConfig(rank=4, target_modules=["query", "attention.output.dense"], factor_dtype=torch.bfloat16)
    assert c.matches("encoder.layer.0.attention.self.query") and c.matches("query")
    assert not c.matches("encoder.layer.0.attention.self.query_proj")
    assert c.matches("bert.attention.output.dense") and not c.matches("x.output.dense")
    r = LoLDUConfig(rank=4, target_modules=r"layer\.\d+\.(query|value)")
    assert r.matches("layer.3.query") and not r.matches("enc.layer.3.query")  # regex must match the whole name
    assert c.factor_dtype == "bfloat16" and c.initial_scale == 0.25
    assert LoLDUConfig.from_dict(c.to_dict()) == c
    assert LoLDUConfig(rank=3, target_modules=["a"], sigma0=0.1).initial_scale == float(torch.tensor(0.1))


# -- inject and forward ----------------------------------------------------------------------------
def test_model_inject_starts_exactly_at_base():
    base, model = injected(rank=4)
    ids, img = inputs()
    kinds = {n: l.kind for n, l in loldu.adapted_layers(model)}
    assert kinds == {"emb": "embedding", "fc1": "linear", "proj": "conv1d", "fc2": "linear", "conv": "conv2d"}
    for _, layer in loldu.adapted_layers(model):
        assert torch.equal(layer.coefficients("default"), torch.zeros(4))
    for a, b in zip(model(ids, img), base(ids, img)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # base weights are not rewritten (delta form)
    for n, layer in loldu.adapted_layers(model):
        assert torch.equal(layer.base_layer.weight, base.get_submodule(n).weight)


def test_model_factors_are_leading_ldu_of_the_right_matrix():
    # Independent check of which (d, k) matrix each kind factorizes: the leading block of
    # torch.linalg.lu in float64 (conv weight flattened, Conv1D weight transposed).
    base, model = injected(rank=3)
    for n, layer in loldu.adapted_layers(model):
        w = base.get_submodule(n).weight.double()
        W = w.reshape(w.shape[0], -1) if layer.kind == "conv2d" else w.t() if layer.kind == "conv1d" else w
        P, L, U = torch.linalg.lu(W)
        r = 3
        torch.testing.assert_close(layer.loldu_PL.double(), (P @ L)[:, :r], rtol=1e-4, atol=1e-5)
        D = U.diagonal()[:r]
        torch.testing.assert_close(layer.loldu_D.double(), D, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.loldu_U.double(), U[:r] / D[:, None], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train_scale", [False, True])
def test_model_forward_and_grads_match_dense_float64_oracle(train_scale):
    _, model = injected(rank=3, train_scale=train_scale, alpha=2.0)
    perturb(model, sigma=True)
    ids, img = inputs()
    h, y = model(ids, img)
    h64, y64 = oracle_forward(model, ids, img)
    assert rel(h, h64) < 1e-5 and rel(y, y64) < 1e-5
    # gradients to z (and sigma): autograd through the float64 dense oracle
    g_h, g_y = torch.randn_like(h), torch.randn_like(y)
    (h * g_h).sum().add_((y * g_y).sum()).backward()
    layers = loldu.adapted_layers(model)
    leaves = {}
    for n, layer in layers:
        leaves[n] = (layer.loldu_z["default"].detach().double().requires_grad_(),
                     layer.loldu_sigma["default"].detach().double().requires_grad_())
    orig = {n: (l.loldu_z["default"], l.loldu_sigma["default"]) for n, l in layers}
    # rebuild the oracle with float64 leaves in place of the parameters
    for n, l in layers:
        l.loldu_z["default"] = nn.Parameter(leaves[n][0])
        l.loldu_sigma["default"] = nn.Parameter(leaves[n][1])
    h64, y64 = oracle_forward(model, ids, img)
    (h64 * g_h.double()).sum().add((y64 * g_y.double()).sum()).backward()
    for n, l in layers:
        z, s = orig[n]
        torch.testing.assert_close(z.grad.double(), l.loldu_z["default"].grad, rtol=1e-4, atol=1e-5)
        if train_scale:
            torch.testing.assert_close(s.grad.double(), l.loldu_sigma["default"].grad, rtol=1e-4, atol=1e-5)
        else:
            assert s.grad is None


def test_model_only_z_trainable_and_counts(capsys):
    base, model = injected(rank=3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(f"{t}.loldu_z.default" for t in TARGETS)
    assert all(p.grad is None for p in base.parameters())
    t, a = loldu.print_trainable_parameters(model)
    total = sum(p.numel() for p in base.parameters()) + 5 * (3 + 1)
    assert (t, a) == (15, total)
    out = capsys.readouterr().out
    assert re.fullmatch(r"trainable params: 15 \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", out)
    assert out.split("all params: ")[1].split(" ")[0] == f"{total:,d}"
    _, model2 = injected(rank=3, train_scale=True)
    assert len(loldu.trainable_parameters(model2)) == 10
    # gradient reaches z, not the frozen base
    h, y = model(*inputs())
    (h.square().mean() + y.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loldu.trainable_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if "loldu_z" not in n)


def test_model_state_dict_has_no_frozen_factors_and_round_trips():
    _, model = injected(rank=3)
    perturb(model)
    sd = model.state_dict()
    assert not any("loldu_PL" in k or "loldu_U" in k or "loldu_D" in k for k in sd)
    assert "fc1.loldu_z.default" in sd and "fc1.base_layer.weight" in sd
    # a fresh injection of the same base, then the saved state: identical outputs
    twin = loldu.inject(copy.deepcopy(loldu.unload(copy.deepcopy(model))), LoLDUConfig(rank=3, target_modules=TARGETS))
    twin.load_state_dict(sd)
    ids, img = inputs()
    for a, b in zip(model(ids, img), twin(ids, img)):
        assert torch.equal(a, b)


def test_model_factor_dtype_and_low_precision_base():
    base = TinyNet().to(torch.bfloat16)
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS))
    layer = dict(loldu.adapted_layers(model))["fc1"]
    assert layer.loldu_PL.dtype == torch.bfloat16 and layer.loldu_D.dtype == torch.float32
    assert layer.loldu_z["default"].dtype == torch.float32
    ids, img = inputs()
    img = img.bfloat16()
    for _, l in loldu.adapted_layers(model):
        assert torch.equal(l.coefficients("default"), torch.zeros(3))  # c exactly 0, in fp32
    (h, y), (h_base, y_base) = model(ids, img), base(ids, img)
    assert torch.equal(y, y_base)  # conv at c = 0: base(x) + an exact zero, the same computation
    # different GEMM paths (fused op: addmm on x's 2-D view; base: F.linear / Conv1D on the 3-D x):
    # equal up to bf16 rounding, bound 2 ulp relative to max |h|.
    assert_close_ulps(h, h_base, 2)
    m32 = loldu.inject(TinyNet(), LoLDUConfig(rank=3, target_modules=["fc1"], factor_dtype="float64"))
    assert dict(loldu.adapted_layers(m32))["fc1"].loldu_PL.dtype == torch.float64
    m64 = loldu.inject(TinyNet().double(), LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(m64)
    ids, img = inputs()
    h, y = m64(ids, img.double())
    h64, y64 = oracle_forward(m64, ids, img)
    assert rel(h, h64) < 1e-12 and rel(y, y64) < 1e-12


def test_model_progress_bar(capsys):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(40)])
    loldu.inject(model, LoLDUConfig(rank=2, target_modules=r"\d+"))
    assert "factorizing" in capsys.readouterr().err
    loldu.inject(nn.Sequential(nn.Linear(8, 8)), LoLDUConfig(rank=2, target_modules=["0"]))
    assert "factorizing" not in capsys.readouterr().err


# -- transactional failures ------------------------------------------------------------------------
def _broken(kind):
    net = TinyNet()
    if kind == "zero":
        nn.init.zeros_(net.fc2.weight)  # rank-deficient leading columns: zero pivot
        return net, TARGETS, "'fc2'"
    if kind == "rank":
        return net, TARGETS + ["norm"], "'norm'"  # LayerNorm is not adaptable
    if kind == "groups":
        net.conv = nn.Conv2d(4, 10, 3, groups=2)
        return net, TARGETS, "'conv'"
    if kind == "nan":
        with torch.no_grad():
            net.proj.weight[0, 0] = float("nan")
        return net, TARGETS, "'proj'"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["zero", "rank", "groups", "nan"])
def test_model_inject_is_transactional(kind):
    net, targets, where = _broken(kind)
    before = snapshot(net)
    with pytest.raises(AdapterError) as e:
        loldu.inject(net, LoLDUConfig(rank=3, target_modules=targets))
    assert where in str(e.value)
    assert_same_snapshot(before, snapshot(net))
    assert not loldu.adapted_layers(net)


def test_model_rank_too_large_names_layer():
    net = TinyNet()
    before = snapshot(net)
    with pytest.raises(AdapterError, match=r"'conv'.*rank 30 exceeds min\(d, k\) = 10"):
        loldu.inject(net, LoLDUConfig(rank=30, target_modules=["conv"]))
    assert_same_snapshot(before, snapshot(net))
    with pytest.raises(AdapterError, match="matches no module"):
        loldu.inject(net, LoLDUConfig(rank=2, target_modules=["nothing"]))
    loldu.inject(net, LoLDUConfig(rank=2, target_modules=["fc1"]))
    with pytest.raises(AdapterError, match="already has LoLDU layers"):
        loldu.inject(net, LoLDUConfig(rank=2, target_modules=["fc2"]))


# -- merge / unmerge / unload / disabled -----------------------------------------------------------
def test_model_merge_matches_unmerged_and_unmerge_restores():
    base, model = injected(rank=4, train_scale=True)
    perturb(model, sigma=True)
    ids, img = inputs()
    with torch.no_grad():
        ref = model(ids, img)
        w_before = {n: l.base_layer.weight.clone() for n, l in loldu.adapted_layers(model)}
        loldu.merge(model)
        merged = model(ids, img)
        for a, b in zip(merged, ref):
            assert rel(a, b) < 1e-5
        for n, l in loldu.adapted_layers(model):  # merged weight == W0 + ΔW
            W = l.base_layer.weight
            assert not torch.equal(W, w_before[n])
        with pytest.raises(AdapterError, match="already merged"):
            loldu.merge(model)
        with pytest.raises(AdapterError, match="merged"):
            loldu.set_adapter(model, "default")
        with pytest.raises(AdapterError, match="merged"):
            with loldu.disabled(model):
                pass
        loldu.unmerge(model)
        for n, l in loldu.adapted_layers(model):
            torch.testing.assert_close(l.base_layer.weight, w_before[n], rtol=0, atol=1e-6)
        for a, b in zip(model(ids, img), ref):
            assert rel(a, b) < 1e-5


def test_model_merged_weight_equals_dense_oracle():
    _, model = injected(rank=4)
    perturb(model)
    dense = dense_weights(model)
    loldu.merge(model)
    for n, l in loldu.adapted_layers(model):
        torch.testing.assert_close(l.base_layer.weight.double(), dense[n], rtol=0, atol=1e-6)


def test_model_unload_returns_original_modules_bit_identical():
    base = TinyNet()
    base.norm.weight.requires_grad_(False)  # a user's own flag survives inject + unload
    originals = {n: base.get_submodule(n) for n in TARGETS}
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    before = snapshot(base)
    model = loldu.inject(base, LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(model)
    model(*inputs())
    out = loldu.unload(model)
    assert out is base
    for n in TARGETS:
        assert base.get_submodule(n) is originals[n]
        assert torch.equal(originals[n].weight, weights[n])
    assert_same_snapshot(before, snapshot(base))
    assert not loldu.adapted_layers(base)


def test_model_merge_and_unload():
    base, model = injected(rank=3)
    perturb(model)
    ids, img = inputs()
    with torch.no_grad():
        ref = model(ids, img)
    plain = loldu.merge_and_unload(model)
    assert type(plain.fc1) is nn.Linear and not loldu.adapted_layers(plain)
    with torch.no_grad():
        for a, b in zip(plain(ids, img), ref):
            assert rel(a, b) < 1e-5


def test_model_disabled_gives_base_outputs_and_restores():
    base, model = injected(rank=3)
    perturb(model)
    ids, img = inputs()
    adapted = model(ids, img)
    with loldu.disabled(model):
        for a, b in zip(model(ids, img), base(ids, img)):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        with loldu.disabled(model):
            raise RuntimeError("boom")
    for a, b in zip(model(ids, img), adapted):
        assert torch.equal(a, b)
    assert rel(adapted[0], base(ids, img)[0]) > 1e-4  # the adapter does change the outputs


# -- named adapters and mixed batches --------------------------------------------------------------
def test_model_named_adapters_share_factors_and_switch():
    base, model = injected(rank=3)
    perturb(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    loldu.add_adapter(model, "b")
    loldu.add_adapter(model, "c", LoLDUConfig(rank=3, target_modules=r"emb|fc1|proj|fc2|conv", alpha=3.0))
    assert loldu.adapter_names(model) == ["default", "b", "c"]
    assert sum(p.numel() for p in model.parameters()) == n_params + 2 * 5 * (3 + 1)
    assert sum(b.numel() for b in model.buffers()) == n_buffers  # factors are shared, not copied
    ids, img = inputs()
    outs = {}
    for name in ["b", "c"]:
        loldu.set_adapter(model, name)
        assert loldu.active_adapter(model) == name
        for a, b in zip(model(ids, img), base(ids, img)):  # new adapters start at the base
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        perturb(model, name)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(f"loldu_z.{name}") for n in trainable)
        outs[name] = model(ids, img)
    loldu.set_adapter(model, "default")
    outs["default"] = model(ids, img)
    for name, out in outs.items():
        h64, y64 = oracle_forward(model, ids, img, name)
        assert rel(out[0], h64) < 1e-5 and rel(out[1], y64) < 1e-5
    assert rel(outs["b"][0], outs["c"][0]) > 1e-4
    loldu.delete_adapter(model, "default")
    assert loldu.adapter_names(model) == ["b", "c"] and loldu.active_adapter(model) == "b"
    for a, b in zip(model(ids, img), outs["b"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("call, word", [
    (lambda m: loldu.add_adapter(m, "default"), "already exists"),
    (lambda m: loldu.add_adapter(m, "bad.name"), "adapter name"),
    (lambda m: loldu.add_adapter(m, "x", LoLDUConfig(rank=2, target_modules=TARGETS)), "rank"),
    (lambda m: loldu.add_adapter(m, "x", LoLDUConfig(rank=3, target_modules=["fc1"])), "'emb'"),
    (lambda m: loldu.add_adapter(m, "x", LoLDUConfig(rank=3, target_modules=TARGETS + ["norm"])), "'norm'"),
    (lambda m: loldu.set_adapter(m, "nope"), "no adapter 'nope'"),
    (lambda m: loldu.delete_adapter(m, "default"), "only adapter"),
    (lambda m: loldu.merge(m, "nope"), "no adapter"),
])
def test_model_adapter_management_errors(call, word):
    _, model = injected(rank=3)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(word)):
        call(model)
    assert_same_snapshot(before, snapshot(model))


def test_model_mixed_batch_rows_use_their_own_adapter():
    base, model = injected(rank=3)
    perturb(model)
    loldu.add_adapter(model, "b")
    perturb(model, "b")
    ids, img = inputs(batch=5)
    rows = ["b", "default", None, "b", "default"]
    with loldu.adapter_ids(model, rows):
        h, y = model(ids, img)
    for i, name in enumerate(rows):
        if name is None:
            with loldu.disabled(model):
                hi, yi = model(ids[i : i + 1], img[i : i + 1])
        else:
            loldu.set_adapter(model, name)
            hi, yi = model(ids[i : i + 1], img[i : i + 1])
        torch.testing.assert_close(h[i : i + 1], hi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[i : i + 1], yi, rtol=1e-5, atol=1e-5)
    # integer ids (-1 = base); gradients reach both adapters' z in one backward
    loldu.set_adapter(model, "default")
    for _, l in loldu.adapted_layers(model):
        l.loldu_z["b"].requires_grad_(True)
    with loldu.adapter_ids(model, torch.tensor([1, 0, -1, 1, 0])):
        h2, y2 = model(ids, img)
    assert torch.equal(h2, h) and torch.equal(y2, y)
    # random weights on the outputs: a plain sum of a LayerNorm output has an exactly zero gradient
    ((h2 * torch.randn_like(h2)).sum() + (y2 * torch.randn_like(y2)).sum()).backward()
    l = dict(loldu.adapted_layers(model))["fc1"]
    assert l.loldu_z["b"].grad.abs().sum() > 0 and l.loldu_z["default"].grad.abs().sum() > 0
    with pytest.raises(AdapterError, match="unknown adapters"):
        with loldu.adapter_ids(model, ["zzz"] * 5):
            pass
    with pytest.raises(AdapterError, match=r"\[-1, 2\)"):
        with loldu.adapter_ids(model, torch.tensor([0, 2])):
            pass
    with pytest.raises(AdapterError, match="5 rows but loldu.adapter_ids gave 2 ids"):
        with loldu.adapter_ids(model, torch.tensor([0, 1])):
            model(ids, img)
    assert all(l._row_ids is None for _, l in loldu.adapted_layers(model))


# -- torch.compile, autocast, checkpointing --------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, k=16, h=32):
        super().__init__()
        self.emb = nn.Embedding(30, k)
        self.up = nn.Linear(k, h)
        self.down = nn.Linear(h, k)

    def forward(self, ids, checkpoint=False):
        x = self.emb(ids)
        f = lambda t: self.down(torch.relu(self.up(t)))  # noqa: E731
        if checkpoint:
            return torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
        return f(x)


def _mlp():
    m = loldu.inject(MLP(), LoLDUConfig(rank=4, target_modules=["emb", "up", "down"], train_scale=True))
    perturb(m, sigma=True)
    return m


def _grads(m):
    return [p.grad.clone() for p in loldu.trainable_parameters(m)]


def test_model_torch_compile_fullgraph_matches_eager():
    # Every layer kind (Embedding, Linear, Conv1D, Conv2d), forward and backward, then a mixed batch.
    _, m = injected(rank=3, train_scale=True)
    perturb(m, sigma=True)
    ids, img = inputs()
    g_h, g_y = (torch.randn_like(t) for t in m(ids, img))
    eager = m(ids, img)
    ((eager[0] * g_h).sum() + (eager[1] * g_y).sum()).backward()
    g_eager = _grads(m)
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(ids, img)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ((out[0] * g_h).sum() + (out[1] * g_y).sum()).backward()
    for a, b in zip(_grads(m), g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert loldu.adapted_layers(compiled)  # the API looks through the compile wrapper
    loldu.add_adapter(compiled, "b")
    perturb(m, "b")
    with torch.no_grad(), loldu.adapter_ids(compiled, ["b", "default", None, "b"]):
        for a, b in zip(compiled(ids, img), m(ids, img)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_model_autocast_bf16():
    m = _mlp()
    ids = torch.randint(0, 30, (3, 7))
    ref = m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) < 3e-2
    out.float().square().sum().backward()
    for p in loldu.trainable_parameters(m):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_model_gradient_checkpointing_same_grads():
    m = _mlp()
    ids = torch.randint(0, 30, (3, 7))
    m(ids).square().sum().backward()
    g = _grads(m)
    m.zero_grad()
    m(ids, checkpoint=True).square().sum().backward()
    for a, b in zip(_grads(m), g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_conv2d_padding_mode_and_stride():
    conv = nn.Conv2d(3, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), padding_mode="reflect")
    net = nn.Sequential(conv)
    model = loldu.inject(copy.deepcopy(net), LoLDUConfig(rank=4, target_modules=["0"]))
    perturb(model)
    x = torch.randn(2, 3, 9, 8)
    layer = model[0]
    dW = (layer.loldu_PL.double() @ torch.diag(c64(layer, "default")) @ layer.loldu_U.double()).reshape(conv.weight.shape)
    xp = F.pad(x.double(), conv._reversed_padding_repeated_twice, mode="reflect")
    ref = F.conv2d(xp, conv.weight.double() + dW, conv.bias.double(), stride=2, dilation=(1, 2))
    assert rel(model(x), ref) < 1e-5


def test_model_cast_after_inject_still_starts_at_base():
    # sigma0 = 1/3 has no exact bf16 value; c must still be exactly 0 after model.to(bfloat16).
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS)).to(torch.bfloat16)
    base = base.to(torch.bfloat16)
    for _, layer in loldu.adapted_layers(model):
        assert layer.loldu_sigma["default"].dtype == torch.bfloat16
        assert torch.equal(layer.coefficients("default"), torch.zeros(3))
    loldu.add_adapter(model, "late")
    assert all(torch.equal(l.coefficients("late"), torch.zeros(3)) for _, l in loldu.adapted_layers(model))
    ids, img = inputs()
    (h, y), (h_base, y_base) = model(ids, img.bfloat16()), base(ids, img.bfloat16())
    assert torch.equal(y, y_base)  # conv at c = 0: base(x) + an exact zero, the same computation
    # different GEMM paths (fused op: addmm on x's 2-D view; base: F.linear / Conv1D on the 3-D x):
    # equal up to bf16 rounding, bound 2 ulp relative to max |h|.
    assert_close_ulps(h, h_base, 2)


def test_model_merge_refuses_tied_weights():
    net = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    net[1].weight = net[0].weight  # tied, as in language models
    model = loldu.inject(net, LoLDUConfig(rank=2, target_modules=["0", "1"]))
    perturb(model)
    before = snapshot(model)
    with pytest.raises(AdapterError, match="'0', '1'.*share one weight"):
        loldu.merge(model)
    assert_same_snapshot(before, snapshot(model))
    ids = torch.randint(0, 16, (2, 3))
    W = net[0].base_layer.weight.double()
    l0, l1 = net[0], net[1]
    dW0 = l0.loldu_PL.double() @ torch.diag(c64(l0, "default")) @ l0.loldu_U.double()
    dW1 = l1.loldu_PL.double() @ torch.diag(c64(l1, "default")) @ l1.loldu_U.double()
    ref = F.linear(F.embedding(ids, W + dW0), W + dW1)  # delta form keeps each layer's own ΔW
    assert rel(model(ids), ref) < 1e-5


def test_model_delete_active_adapter_while_other_merged_changes_nothing():
    base, model = injected(rank=3)
    loldu.add_adapter(model, "B")
    perturb(model, "B")
    loldu.merge(model, "B")
    with pytest.raises(AdapterError, match="merged"):
        loldu.delete_adapter(model, "default")
    assert loldu.adapter_names(model) == ["default", "B"] and loldu.active_adapter(model) == "default"
    loldu.unmerge(model)
    loldu.delete_adapter(model, "default")
    assert loldu.adapter_names(model) == ["B"] and loldu.active_adapter(model) == "B"


def test_model_merge_and_unload_refuses_other_merged_adapter():
    base, model = injected(rank=3)
    loldu.add_adapter(model, "B")
    perturb(model, "default")
    perturb(model, "B")
    loldu.merge(model, "default")
    with pytest.raises(AdapterError, match="'default' is merged, not 'B'"):
        loldu.merge_and_unload(model, "B")
    assert loldu.adapted_layers(model)
    plain = loldu.merge_and_unload(model, "default")
    assert not loldu.adapted_layers(plain)


def test_model_merge_refuses_weight_tied_to_untargeted_module():
    net = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    net[1].weight = net[0].weight  # GPT-2 style: lm_head targeted, wte not
    emb = net[0].weight.detach().clone()
    model = loldu.inject(net, LoLDUConfig(rank=2, target_modules=["1"]))
    perturb(model)
    with pytest.raises(AdapterError, match="'1'.*0.weight"):
        loldu.merge(model)
    assert torch.equal(net[0].weight, emb) and net[1].merged_adapter is None


def test_model_conv2d_unbatched_input():
    base, model = injected(rank=3)
    perturb(model)
    x = torch.randn(3, 6, 6)  # (C, H, W), no batch dim
    conv = model.conv
    with torch.no_grad():
        y = conv(x)
        assert y.shape == base.conv(x).shape == (10, 6, 6)
        W = dense_weights(model)["conv"]
        ref = F.conv2d(x.double().unsqueeze(0), W, conv.base_layer.bias.double(), padding=1).squeeze(0)
        assert rel(y, ref) < 1e-5
        torch.testing.assert_close(y, conv(x.unsqueeze(0)).squeeze(0), rtol=1e-5, atol=1e-6)


def test_model_adapter_ids_rejects_str_and_nested_restores():
    base, model = injected(rank=3)
    loldu.add_adapter(model, "B")
    with pytest.raises(AdapterError, match="sequence of adapter names"):
        with loldu.adapter_ids(model, "default"):
            pass
    with loldu.adapter_ids(model, ["default", "B"]):
        outer = [l._row_ids.clone() for _, l in loldu.adapted_layers(model)]
        with loldu.adapter_ids(model, ["B", None]):
            pass
        for (_, l), ids in zip(loldu.adapted_layers(model), outer):
            assert l._row_ids is not None and torch.equal(l._row_ids, ids)
    assert all(l._row_ids is None for _, l in loldu.adapted_layers(model))
