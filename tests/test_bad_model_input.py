"""Models, configs, names and directories loldu cannot work with: each is refused with a loldu error
naming the layer, file or value, and the refused call leaves the model, its weights and the files
on disk exactly as they were.
"""
import copy
import json
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
from _model_helpers import TARGETS, TinyNet, assert_same_snapshot, inputs, perturb, snapshot

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterWarning
from loldu.model import CALL_CHECK_FORWARDS as N


class Two(nn.Module):
    def __init__(self, fc=None, head=None, dim=16):
        super().__init__()
        self.fc = fc if fc is not None else nn.Linear(dim, dim)
        self.head = head if head is not None else nn.Linear(dim, dim)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def files(d):
    return {p: (d / p).read_bytes() if (d / p).is_file() else "dir" for p in sorted(os.listdir(d))}


def refused_inject(model, config, *words, **kw):
    before = snapshot(model)
    hooks = n_hooks(model)
    with pytest.raises(AdapterError) as e:
        loldu.inject(model, config, **kw)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert_same_snapshot(before, snapshot(model))
    assert not loldu.adapted_layers(model) and n_hooks(model) == hooks
    return str(e.value)


# -- weights recomputed on every forward: merge would be a silent no-op -----------------------------
PARAMETRIZED = {
    "weight_norm": (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)), "remove_parametrizations"),
    "spectral_norm": (lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(16, 16)), "remove_parametrizations"),
    "old_weight_norm": (lambda: nn.utils.weight_norm(nn.Linear(16, 16)), "nn.utils.remove_weight_norm"),
    "old_spectral_norm": (lambda: nn.utils.spectral_norm(nn.Linear(16, 16)), "nn.utils.remove_spectral_norm"),
}


@pytest.mark.parametrize("how", list(PARAMETRIZED))
def test_parametrized_weight_is_refused_at_inject_and_load(how, tmp_path):
    make, fix = PARAMETRIZED[how]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old nn.utils.weight_norm is deprecated
        model = Two(fc=make())
    refused_inject(model, LoLDUConfig(rank=4, target_modules=["fc", "head"]), "layer 'fc'", "merge", fix)
    # an adapter trained on the same weights without the parametrization is refused too
    plain = Two(fc=nn.Linear(16, 16))
    with torch.no_grad():
        plain.fc.weight.copy_(model.fc.weight)
        plain.fc.bias.copy_(model.fc.bias)
        plain.head.load_state_dict(model.head.state_dict())
    loldu.save_adapter(loldu.inject(plain, LoLDUConfig(rank=4, target_modules=["fc", "head"])), tmp_path)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(str(tmp_path)) + ".*layer 'fc'.*" + re.escape(fix)):
        loldu.load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))


def test_merge_refuses_a_weight_parametrized_after_inject():
    model = loldu.inject(Two(), LoLDUConfig(rank=4, target_modules=["fc", "head"]))
    perturb(model)
    nn.utils.parametrizations.weight_norm(model.head.base_layer)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"loldu\.merge: layer 'head'.*parametrized"):
        loldu.merge(model)
    assert_same_snapshot(before, snapshot(model))
    assert all(layer.merged_adapter is None for _, layer in loldu.adapted_layers(model))


# -- merge is transactional ---------------------------------------------------------------------------
def test_merge_refuses_an_inference_tensor_and_changes_nothing():
    fc = nn.Linear(16, 16)
    with torch.inference_mode():
        head = nn.Linear(16, 16)  # its weight is an inference tensor
    model = loldu.inject(Two(fc=fc, head=head), LoLDUConfig(rank=4, target_modules=["fc", "head"]))
    perturb(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = model(x)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"loldu\.merge: layer 'head' \(weight \(16, 16\)\).*inference"):
        loldu.merge(model)
    assert_same_snapshot(before, snapshot(model))  # 'fc' (before 'head') was not merged either
    assert all(layer.merged_adapter is None for _, layer in loldu.adapted_layers(model))
    with pytest.raises(AdapterError, match="layer 'head'"):
        loldu.merge_and_unload(model)
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x), y)
    with torch.inference_mode():  # where inference tensors can be written, merging works
        loldu.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    merged = snapshot(model)
    for call in (loldu.unmerge, loldu.unload):  # and so does unmerging
        with pytest.raises(AdapterError, match=rf"loldu\.{call.__name__}: layer 'head'.*inference"):
            call(model)
        assert_same_snapshot(merged, snapshot(model))
        assert all(layer.merged_adapter == "default" for _, layer in loldu.adapted_layers(model))
    with torch.inference_mode():
        loldu.unload(model)
    assert not loldu.adapted_layers(model)


def test_merge_refuses_non_finite_coefficients():
    model = loldu.inject(Two(), LoLDUConfig(rank=4, target_modules=["fc", "head"]))
    with torch.no_grad():
        model.head.loldu_z["default"][1] = float("nan")
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"layer 'head'.*NaN/Inf coefficients"):
        loldu.merge(model)
    assert_same_snapshot(before, snapshot(model))


def test_merge_failing_midway_unmerges_the_layers_already_merged():
    model = loldu.inject(Two(), LoLDUConfig(rank=4, target_modules=["fc", "head"]))
    perturb(model)
    before = snapshot(model)

    def out_of_memory(name):
        raise RuntimeError("CUDA out of memory (simulated)")

    model.head.merge = out_of_memory
    with pytest.raises(AdapterError, match=r"layer 'head'.*out of memory.*1 layer\(s\) merged before it were unmerged"):
        loldu.merge(model)
    assert all(layer.merged_adapter is None for _, layer in loldu.adapted_layers(model))
    after = snapshot(model)
    assert after[1:] == before[1:]
    for k, v in before[0].items():  # as loldu.unmerge leaves them: up to one rounding
        torch.testing.assert_close(after[0][k], v, rtol=1e-6, atol=1e-6)


# -- a module registered under two names ---------------------------------------------------------------
class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = self.enc  # one module, two names

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


@pytest.mark.parametrize("targets", [["enc"], ["dec"], r"enc|dec"])
def test_module_registered_under_two_names_is_refused(targets):
    refused_inject(Aliased(), LoLDUConfig(rank=2, target_modules=targets), "'enc'", "'dec'", "without the adapter")


def test_shared_parent_is_fine():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(8, 8))
            self.b = self.a  # the parent is shared; the layer replaces the child in that one object

        def forward(self, x):
            return self.b(self.a(x))

    model = loldu.inject(Shared(), LoLDUConfig(rank=2, target_modules=["a.0"]))
    assert model.b[0] is model.a[0] and isinstance(model.b[0], loldu.layer.LoLDULayer)
    model(torch.randn(2, 8)).square().sum().backward()
    assert model.a[0].loldu_z["default"].grad.abs().sum() > 0


# -- the call check tolerates parents that call a layer only in some forwards ----------------------------
class TopOneMoE(nn.Module):
    """A top-1 mixture of experts: the parent calls one expert per forward."""

    def __init__(self, n=4, dim=8):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n)])
        self.pick = 0

    def forward(self, x):
        return self.experts[self.pick](x)


def test_mixture_of_experts_trains_without_errors():
    model = loldu.inject(TopOneMoE(), LoLDUConfig(rank=2, target_modules=r"experts\.\d"))
    for k in [0, 0, 2, 0, 1, 3]:  # every expert is used within N forwards
        model.pick = k
        model(torch.randn(3, 8)).square().sum().backward()
        assert model.experts[k].loldu_z["default"].grad.abs().sum() > 0
    assert n_hooks(model) == 0  # every layer settled: no hook left


def test_mixture_of_experts_expert_never_picked_raises_after_n_forwards():
    model = loldu.inject(TopOneMoE(), LoLDUConfig(rank=2, target_modules=r"experts\.\d"))
    model.pick = 1
    for _ in range(N - 1):
        model(torch.randn(3, 8))
    with pytest.raises(AdapterError, match=rf"'experts\.0' was never called in the {N} forwards.*\(TopOneMoE\)"
                                           r".*3 such layers.*check_calls=False"):
        model(torch.randn(3, 8))


def test_early_exit_branch_is_fine():
    class EarlyExit(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x, exit_early=False):
            h = self.fc1(x)
            return h if exit_early else self.fc2(h)

    model = loldu.inject(EarlyExit(), LoLDUConfig(rank=2, target_modules=["fc1", "fc2"]))
    for _ in range(N - 1):
        model(torch.randn(2, 8), exit_early=True)
    model(torch.randn(2, 8))
    assert n_hooks(model) == 0


def test_check_calls_false_skips_the_check(tmp_path):
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(x, self.proj.weight, self.proj.bias)

    model = loldu.inject(ReadsWeight(), LoLDUConfig(rank=2, target_modules=["proj"]), check_calls=False)
    assert n_hooks(model) == 0
    for _ in range(2 * N):
        model(torch.randn(2, 8))
    loldu.save_adapter(model, tmp_path)
    other = loldu.load_adapter(loldu.unload(model), tmp_path, check_calls=False)
    assert n_hooks(other) == 0
    for _ in range(2 * N):
        other(torch.randn(2, 8))
    refused_inject(ReadsWeight(), LoLDUConfig(rank=2, target_modules=["proj"]), "check_calls", check_calls="no")
    # the static refusals stay
    with pytest.raises(AdapterError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        attn = nn.Module()
        attn.attn = nn.MultiheadAttention(16, 2)
        loldu.inject(attn, LoLDUConfig(rank=2, target_modules=["out_proj"]), check_calls=False)


# -- bare exceptions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, word", [
    (lambda: Two(fc=nn.LazyLinear(16)), "uninitialized (a lazy module)"),
    (lambda: Two(fc=nn.Linear(16, 16, device="meta")), "meta device"),
])
def test_lazy_and_meta_weights_are_refused(make, word):
    model = make()
    params = [(n, p, p.requires_grad) for n, p in model.named_parameters()]  # values: none to compare
    hooks = n_hooks(model)  # a lazy module's own initialization hook
    with pytest.raises(AdapterError, match=f"layer 'fc'.*{re.escape(word)}"):
        loldu.inject(model, LoLDUConfig(rank=2, target_modules=["fc", "head"]))
    assert [(n, p, p.requires_grad) for n, p in model.named_parameters()] == params
    assert not loldu.adapted_layers(model) and n_hooks(model) == hooks


@pytest.mark.parametrize("model", [None, "model", [nn.Linear(4, 4)]])
def test_non_module_model_is_refused(model, tmp_path):
    cfg = LoLDUConfig(rank=2, target_modules=["fc"])
    with pytest.raises(AdapterError, match="torch.nn.Module"):
        loldu.inject(model, cfg)
    for call in (loldu.merge, loldu.unmerge, loldu.unload, loldu.adapter_names,
                 lambda m: loldu.save_adapter(m, tmp_path / "x"), lambda m: loldu.load_adapter(m, tmp_path / "x"),
                 lambda m: loldu.set_adapter(m, "default"), lambda m: loldu.add_adapter(m, "b")):
        with pytest.raises(AdapterError):
            call(model)


def _injected():
    model = loldu.inject(TinyNet(), LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(model)
    loldu.add_adapter(model, "b")
    return model


@pytest.mark.parametrize("name", [["b"], {"b": 1}, 3, b"b"])
@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter", "merge", "save_adapter", "merge_and_unload"])
def test_non_str_adapter_names_are_refused(call, name, tmp_path):
    model = _injected()
    before = snapshot(model)
    with pytest.raises(AdapterError, match="adapter_name must be a str"):
        if call == "save_adapter":
            loldu.save_adapter(model, tmp_path / "a", adapter_name=name)
        else:
            getattr(loldu, call)(model, name)
    assert_same_snapshot(before, snapshot(model))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("directory", ["/tmp/x\0b", b"/tmp/x", 3, None])
def test_bad_directories_are_refused(directory):
    model = _injected()
    with pytest.raises(AdapterError, match="loldu.save_adapter"):
        loldu.save_adapter(model, directory)
    with pytest.raises(AdapterError, match="loldu.load_adapter"):
        loldu.load_adapter(TinyNet(), directory)
    with pytest.raises(AdapterError, match="loldu.read_adapter"):
        loldu.adapter_io.read_adapter(directory)


@pytest.mark.parametrize("kw, word", [
    (dict(factor_dtype=["float32"]), "factor_dtype"),
    (dict(factor_dtype={"float32": 1}), "factor_dtype"),
    (dict(alpha=10**400), "alpha must be a finite number"),
    (dict(sigma0=-(10**400)), "sigma0 must be a finite number"),
])
def test_config_unhashable_and_huge_values_are_adapter_errors(kw, word):
    with pytest.raises(AdapterError, match=word):
        LoLDUConfig(rank=2, target_modules=["fc"], **kw)


# -- config extremes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, word", [
    (dict(sigma0=1e39), "overflows float32"),
    (dict(sigma0=-1e39), "overflows float32"),
    (dict(alpha=1e300), "overflows float32"),
    (dict(alpha=3e39, rank=2), "overflows float32"),
    (dict(sigma0=0.0), "zero or subnormal"),
    (dict(sigma0=-0.0), "zero or subnormal"),
    (dict(sigma0=1e-50), "zero or subnormal"),
    (dict(sigma0=1e-40), "zero or subnormal"),  # a float32 subnormal
    (dict(alpha=1e-50), "zero or subnormal"),
    (dict(alpha=1e-38, rank=8), "zero or subnormal"),
])
def test_initial_scale_must_be_a_normal_float32(kw, word):
    kw = {"rank": 2, **kw}
    with pytest.raises(AdapterError, match=word):
        LoLDUConfig(target_modules=["fc"], **kw)


@pytest.mark.parametrize("kw", [dict(sigma0=3e38), dict(sigma0=-2e-38), dict(alpha=1e-30), dict(alpha=-2.0)])
def test_extreme_but_normal_scales_are_accepted(kw):
    cfg = LoLDUConfig(rank=2, target_modules=["fc"], **kw)
    s = cfg.initial_scale
    assert math.isfinite(s) and abs(s) >= torch.finfo(torch.float32).tiny


def _restore_config(d, edit):
    """Rewrites the config stored in an adapter (and its hashes), as a hand edit with the right tools would."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(d / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    header = json.loads(meta["loldu_config"])
    edit(header)
    text = json.dumps(header)
    meta.update(loldu_config=text, loldu_config_sha256=hashlib.sha256(text.encode()).hexdigest())
    save_file(load_file(d / WEIGHTS_NAME), str(d / WEIGHTS_NAME), metadata=meta)
    (d / CONFIG_NAME).write_text(text)


@pytest.mark.parametrize("key, value", [("alpha", 10**400), ("sigma0", 1e39), ("sigma0", 0.0),
                                        ("factor_dtype", ["float32"])])
def test_load_refuses_a_hand_edited_config(tmp_path, key, value):
    base = TinyNet()
    loldu.save_adapter(loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS)), tmp_path)
    _restore_config(tmp_path, lambda h: h["config"].__setitem__(key, value))
    on_disk = files(tmp_path)
    before = snapshot(base)
    with pytest.raises(AdapterError, match=re.escape(str(tmp_path / WEIGHTS_NAME)) + ": invalid config.*" + key):
        loldu.load_adapter(base, tmp_path)
    assert_same_snapshot(before, snapshot(base))
    assert files(tmp_path) == on_disk


# -- save_adapter refuses before touching the directory ----------------------------------------------------
@pytest.mark.parametrize("what, value", [("z", float("nan")), ("z", float("inf")), ("sigma", float("nan"))])
def test_save_refuses_non_finite_adapter_and_keeps_the_file(tmp_path, what, value):
    model = _injected()
    loldu.save_adapter(model, tmp_path)
    good = files(tmp_path)
    with torch.no_grad():
        t = getattr(model.fc2, f"loldu_{what}")["default"]
        t.view(-1)[0] = value
    with pytest.raises(AdapterError, match=r"layer 'fc2'.*NaN/Inf.*nothing was written"):
        loldu.save_adapter(model, tmp_path)
    assert files(tmp_path) == good
    with pytest.raises(AdapterError, match="layer 'fc2'"):
        loldu.save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    loldu.save_adapter(model, tmp_path / "b", adapter_name="b")  # the other adapter is fine


def test_save_with_a_directory_in_place_of_the_config_copy_changes_nothing(tmp_path):
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS))
    perturb(model)
    loldu.save_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    (tmp_path / CONFIG_NAME).mkdir()
    good = files(tmp_path)
    perturb(model)
    with pytest.raises(AdapterError, match=re.escape(CONFIG_NAME) + ".*unchanged"):
        loldu.save_adapter(model, tmp_path)
    assert files(tmp_path) == good  # the weights file too
    with pytest.warns(AdapterWarning):
        loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path)
    assert not torch.equal(loaded.fc1.loldu_z["default"], model.fc1.loldu_z["default"])  # the old adapter
    (tmp_path / WEIGHTS_NAME).unlink()
    (tmp_path / WEIGHTS_NAME).mkdir()
    good = files(tmp_path)
    with pytest.raises(AdapterError, match=re.escape(WEIGHTS_NAME) + ".*unchanged"):
        loldu.save_adapter(model, tmp_path)
    assert files(tmp_path) == good


def test_save_whose_config_copy_fails_after_the_commit_warns_and_loads_the_new_adapter(tmp_path, monkeypatch):
    base = TinyNet()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=3, target_modules=TARGETS))
    loldu.save_adapter(model, tmp_path)
    old_copy = (tmp_path / CONFIG_NAME).read_bytes()
    perturb(model)
    real = os.replace

    def copy_fails(src, dst):
        if str(dst).endswith(CONFIG_NAME):
            raise PermissionError(13, "Operation not permitted", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", copy_fails)
    with pytest.warns(AdapterWarning, match=r"was saved.*" + re.escape(CONFIG_NAME) + ".*could not be replaced"):
        written = loldu.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert set(written) == {WEIGHTS_NAME}
    assert (tmp_path / CONFIG_NAME).read_bytes() == old_copy  # stale, untouched
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary left
    with pytest.warns(AdapterWarning):
        loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path)
    for (_, a), (_, b) in zip(loldu.adapted_layers(loaded), loldu.adapted_layers(model)):
        assert torch.equal(a.loldu_z["default"], b.loldu_z["default"])  # the new adapter


# -- non-finite base weights -----------------------------------------------------------------------------
def _poisoned(value, layer="fc2"):
    """TinyNet whose `layer` holds `value` where the rank-3 factorization does not read it."""
    model = TinyNet()
    with torch.no_grad():
        W = loldu.layer.weight_matrix(getattr(model, layer))
        W[:, :3] = torch.randn(W.shape[0], 3)
        W[-1, :3] = 0.0  # never a pivot row
        W[-1, -1] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("layer", ["fc2", "conv", "proj"])
def test_non_finite_weights_are_refused_at_inject(value, layer):
    refused_inject(_poisoned(value, layer), LoLDUConfig(rank=3, target_modules=TARGETS), f"layer '{layer}'",
                   "NaN or Inf")


def test_non_finite_weights_are_refused_at_load(tmp_path):
    clean = _poisoned(0.5)
    loldu.save_adapter(loldu.inject(copy.deepcopy(clean), LoLDUConfig(rank=3, target_modules=TARGETS)), tmp_path)
    model = copy.deepcopy(clean)
    with torch.no_grad():
        model.fc2.weight[-1, -1] = float("nan")  # outside what the fingerprint reads
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(str(tmp_path)) + r".*layer 'fc2'.*NaN or Inf"):
        loldu.load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))
    loldu.load_adapter(clean, tmp_path)  # the clean base loads
    ids, img = inputs()
    assert all(torch.isfinite(t).all() for t in clean(ids, img))
