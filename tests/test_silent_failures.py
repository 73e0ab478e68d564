"""Adapters that would be silently ignored, and adapter_ids contexts whose adapters change under them.

1. A module whose parent reads its weight instead of calling it (nn.MultiheadAttention.out_proj)
   gets no gradient, yet merge changes the outputs: known cases are refused at inject/load time,
   unknown parents are caught once they have run CALL_CHECK_FORWARDS times without calling it.
2. loldu.adapter_ids holds the adapter names it was entered with: delete_adapter, merge and unload
   inside it are refused and change nothing.
"""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _model_helpers import TARGETS, TinyNet, assert_same_snapshot, inputs, perturb, snapshot

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.model import CALL_CHECK_FORWARDS as N


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def z_grads(model):
    return {n: l.loldu_z[l.active_adapter].grad for n, l in loldu.adapted_layers(model)}


# -- 1a: refused at inject time --------------------------------------------------------------------
class Attn(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("targets, words", [
    (["attn.out_proj"], ["'attn.out_proj'", "MultiheadAttention", "remove it from target_modules"]),
    (["fc", "out_proj"], ["'attn.out_proj'", "MultiheadAttention", "the entry 'out_proj'"]),
    (r"attn\.out_proj|fc", ["'attn.out_proj'", "together with 1 other", "change the regex", "does not match"]),
])
def test_inject_refuses_multihead_attention_out_proj(targets, words):
    model = Attn()
    before = snapshot(model)
    with pytest.raises(AdapterError) as e:
        loldu.inject(model, LoLDUConfig(rank=4, target_modules=targets))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert_same_snapshot(before, snapshot(model))
    assert not loldu.adapted_layers(model) and n_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_transformer_layers_refused_where_bypassed_and_trained_where_called():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
                           batch_first=True)
    before = snapshot(model)
    # The encoder layer's inference fast path reads linear1/linear2.weight; every MHA reads out_proj.weight.
    for targets, culprit in [(r".*linear\d", "encoder.layers.0.linear1"),
                             (r"decoder.*(linear\d|out_proj)", "decoder.layers.0.self_attn.out_proj"),
                             (["multihead_attn.out_proj"], "decoder.layers.0.multihead_attn.out_proj")]:
        with pytest.raises(AdapterError, match=re.escape(f"'{culprit}'")):
            loldu.inject(model, LoLDUConfig(rank=2, target_modules=targets))
        assert_same_snapshot(before, snapshot(model))
    # The decoder layer calls its linear1/linear2: they train.
    loldu.inject(model, LoLDUConfig(rank=2, target_modules=r"decoder\.layers\.\d\.linear\d"))
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    model(src, tgt).square().sum().backward()
    grads = z_grads(model)
    assert set(grads) == {"decoder.layers.0.linear1", "decoder.layers.0.linear2"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch without nn.LinearCrossEntropyLoss")
def test_inject_refuses_linear_cross_entropy_linear():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = nn.LinearCrossEntropyLoss(8, 5)

        def forward(self, x, t):
            return self.loss(x, t)

    with pytest.raises(AdapterError, match=r"'loss\.linear'.*LinearCrossEntropyLoss"):
        loldu.inject(Head(), LoLDUConfig(rank=2, target_modules=["loss.linear"]))


def test_load_adapter_refuses_multihead_attention_out_proj(tmp_path):
    class Plain(nn.Module):  # same module names, but out_proj is called
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.out_proj = nn.Linear(16, 16)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn.out_proj(x))

    src = loldu.inject(Plain(), LoLDUConfig(rank=4, target_modules=["attn.out_proj", "fc"]))
    loldu.save_adapter(src, tmp_path / "a")
    model = Attn()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        loldu.load_adapter(model, tmp_path / "a")
    assert_same_snapshot(before, snapshot(model))
    assert n_hooks(model) == 0


# -- 1b: caught in the first forwards -------------------------------------------------------------
class ReadsWeight(nn.Module):
    """An unknown parent that reads its child's weight instead of calling it."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class Bypassing(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.block = ReadsWeight(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(self.block(x))


def test_forward_raises_for_a_layer_its_parent_does_not_call():
    model = loldu.inject(Bypassing(), LoLDUConfig(rank=2, target_modules=["block.proj", "fc"]))
    x = torch.randn(3, 8)
    for _ in range(N - 1):  # the parent may still call it in a later forward
        model(x)
    assert n_hooks(model) > 0
    for _ in range(2):  # the N-th forward raises, and so does the next: the failing layer stays checked
        with pytest.raises(AdapterError, match=r"'block\.proj'.*parent 'block' \(ReadsWeight\)"):
            model(x)
    with pytest.raises(AdapterError, match=r"'block\.proj'"):  # also under no_grad / eval
        with torch.no_grad():
            model.eval()(x)
    loldu.unload(model)
    assert n_hooks(model) == 0 and not loldu.adapted_layers(model)
    model(x)  # the plain model runs


def test_forward_raises_for_multihead_attention_subclass_with_own_forward():
    class MHA(nn.MultiheadAttention):  # overrides forward, so not refused statically
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Attn()
    model.attn = MHA(16, 2, batch_first=True)
    loldu.inject(model, LoLDUConfig(rank=2, target_modules=["out_proj", "fc"]))
    for _ in range(N - 1):
        model(torch.randn(2, 3, 16))
    with pytest.raises(AdapterError, match=r"'attn\.out_proj'.*\(MHA\).*check_calls=False"):
        model(torch.randn(2, 3, 16))


class Containers(nn.Module):
    """Layers in a ModuleList, in a Sequential used as a container, called twice, and called by the
    grandparent after their parent ran (without calling them)."""

    def __init__(self, dim=8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.seq = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.inner = nn.Sequential(nn.Linear(dim, dim))
        self.side = Holder(dim)
        self.twice = nn.Linear(dim, dim)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = self.seq[0](x)
        x = self.inner(x)
        x = self.side(x) + self.side.head(x)  # Holder.forward does not call head; its parent does
        return self.twice(self.twice(x))


class Holder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        return x * 2


CONTAINER_TARGETS = r"blocks\.\d|seq\.0|inner\.0|side\.head|twice"


def test_first_forward_check_passes_and_removes_every_hook():
    model = loldu.inject(Containers(), LoLDUConfig(rank=2, target_modules=CONTAINER_TARGETS))
    assert n_hooks(model) > 0
    x = torch.randn(3, 8)
    perturb(model)
    y = model(x)
    assert n_hooks(model) == 0  # no cost after the first forward
    y.square().sum().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in z_grads(model).values())
    torch.testing.assert_close(model(x), y)


def test_submodule_called_alone_settles_only_its_own_layers():
    model = loldu.inject(Bypassing(), LoLDUConfig(rank=2, target_modules=["block.proj", "fc"]))
    model.fc(torch.randn(2, 8))  # a layer called directly: nothing to check for it
    for _ in range(N - 1):
        model.block(torch.randn(2, 8))
    with pytest.raises(AdapterError, match=r"'block\.proj'"):
        model.block(torch.randn(2, 8))
    model = loldu.inject(Containers(), LoLDUConfig(rank=2, target_modules=CONTAINER_TARGETS))
    model.inner(torch.randn(2, 8))
    assert n_hooks(model) > 0  # the root's layers are still pending
    model(torch.randn(2, 8))
    assert n_hooks(model) == 0


def test_forward_that_raises_is_not_checked():
    class Fails(Bypassing):
        def forward(self, x, fail=False):
            h = self.block.proj(x)  # a parent that does call the layer, unless it raises first
            if fail:
                raise RuntimeError("boom")
            return self.fc(h)

    model = loldu.inject(Fails(), LoLDUConfig(rank=2, target_modules=["fc"]))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 8), fail=True)  # fc never ran: no AdapterError, still pending
    assert n_hooks(model) > 0
    model(torch.randn(2, 8))
    assert n_hooks(model) == 0


def test_torch_compile_fullgraph_first_forward():
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(model)
    ids, img = inputs()
    compiled = torch.compile(model, fullgraph=True)  # the very first forward is traced
    out = compiled(ids, img)
    eager = model(ids, img)  # the check runs here and removes its hooks
    assert n_hooks(model) == 0
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled(ids, img), eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_parent_with_compiled_forward_is_not_flagged():
    class Compiled(Bypassing):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    model = loldu.inject(Compiled(), LoLDUConfig(rank=2, target_modules=["block.0", "fc"]))
    perturb(model)
    x = torch.randn(3, 8)
    clone = copy.deepcopy(model)
    ref = clone.fc(clone.block[1](clone.block[0](x)))  # layers called on their own: not checked
    model.block.forward = torch.compile(model.block.forward)  # its hooks run eagerly, its calls do not
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert n_hooks(model) == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_first_forward(reentrant):
    class Ckpt(Containers):
        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=reentrant)

    model = loldu.inject(Ckpt(), LoLDUConfig(rank=2, target_modules=CONTAINER_TARGETS))
    perturb(model)
    x = torch.randn(3, 8, requires_grad=True)
    model(x).square().sum().backward()
    assert n_hooks(model) == 0
    assert all(g is not None and g.abs().sum() > 0 for g in z_grads(model).values())


def test_deepcopy_before_first_forward_checks_the_copy():
    model = loldu.inject(Bypassing(), LoLDUConfig(rank=2, target_modules=["block.proj", "fc"]))
    model(torch.randn(2, 8))  # counted once before the copy: the copy carries the count
    clone = copy.deepcopy(model)
    for m in (clone, model):
        for _ in range(N - 2):
            m(torch.randn(2, 8))
        with pytest.raises(AdapterError, match=r"'block\.proj'"):
            m(torch.randn(2, 8))


# -- 2: adapter_ids holds its adapters -------------------------------------------------------------
def _two_adapters():
    model = loldu.inject(TinyNet(), LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(model)
    loldu.add_adapter(model, "b")
    perturb(model, "b")
    return model


@pytest.mark.parametrize("call, word", [
    (lambda m: loldu.delete_adapter(m, "b"), "loldu.delete_adapter: adapter 'b' is in use by loldu.adapter_ids"),
    (lambda m: loldu.delete_adapter(m, "default"), "adapter 'default' is in use by loldu.adapter_ids"),
    (lambda m: loldu.merge(m), "loldu.merge: adapter 'default' is in use by loldu.adapter_ids"),
    (lambda m: loldu.unload(m), "loldu.unload"),
    (lambda m: loldu.merge_and_unload(m, "b"), "loldu.merge_and_unload"),
])
def test_adapter_ids_context_refuses_changes_and_keeps_the_model(call, word):
    model = _two_adapters()
    ids, img = inputs(batch=3)
    rows = ["b", None, "default"]
    with torch.no_grad(), loldu.adapter_ids(model, rows):
        ref = model(ids, img)
        before = snapshot(model)
        with pytest.raises(AdapterError, match=re.escape(word) + ".*leave the context first"):
            call(model)
        assert_same_snapshot(before, snapshot(model))
        assert loldu.adapter_names(model) == ["default", "b"] and loldu.active_adapter(model) == "default"
        for a, b in zip(model(ids, img), ref):
            assert torch.equal(a, b)
    loldu.delete_adapter(model, "b")  # allowed once the context is left
    assert loldu.adapter_names(model) == ["default"]


def test_add_adapter_inside_adapter_ids_leaves_the_rows_alone():
    model = _two_adapters()
    ids, img = inputs(batch=3)
    with torch.no_grad(), loldu.adapter_ids(model, ["b", None, "default"]):
        ref = model(ids, img)
        loldu.add_adapter(model, "c")
        perturb(model, "c")
        for a, b in zip(model(ids, img), ref):
            assert torch.equal(a, b)
    assert loldu.adapter_names(model) == ["default", "b", "c"]
