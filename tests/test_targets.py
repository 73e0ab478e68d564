"""Which modules target_modules selects (loldu.targets): 'all-linear' is expanded once into module
names, then matched by name like the other forms."""
import copy

import pytest
import torch.nn as nn
from test_bad_model_input import Aliased, refused_inject

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import read_adapter
from loldu.targets import all_linear, selector


class SharedNorm(nn.Module):
    """A module registered under two names that no form of target_modules here selects."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.norm_again = self.norm

    def forward(self, x):
        return self.norm_again(self.norm(self.proj(x)))


class WithHeads(nn.Module):
    """Three linears, a task head, an output head (get_output_embeddings) and an attention whose
    out_proj its parent never calls."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.classifier = nn.Linear(8, 2)
        self.lm_head = nn.Linear(8, 16)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        h = self.q(x) + self.k(x) + self.v(x)
        return self.classifier(h), self.lm_head(h)


@pytest.mark.parametrize("targets", [["enc"], ["dec"], r"enc|dec", r"dec", "all-linear"])
def test_a_module_registered_under_two_names_is_refused_for_every_form(targets):
    message = refused_inject(Aliased(), LoLDUConfig(rank=2, target_modules=targets))  # the model is left unchanged
    assert message == ("layer 'enc' is also registered as 'dec' (one module object under two names): LoLDU would "
                       "replace it under 'enc' only, so calls through 'dec' would run without the adapter. Give each "
                       "name its own module (e.g. copy.deepcopy) or leave it out of target_modules")


def test_a_shared_module_that_is_not_targeted_is_fine():
    for targets in ("all-linear", ["proj"], "proj"):
        model = loldu.inject(SharedNorm(), LoLDUConfig(rank=2, target_modules=targets))
        assert [n for n, _ in loldu.adapted_layers(model)] == ["proj"]


def test_all_linear_is_the_names_of_the_linears_a_list_would_give():
    model = WithHeads()
    names = all_linear(model, LoLDUConfig(rank=2, target_modules="all-linear"))
    assert names == ["q", "k", "v"]  # not the task head, the output head, nor out_proj (never called)
    with pytest.warns(loldu.LolduWarning, match="leaves the task head 'classifier' out"):
        by_kind = loldu.inject(WithHeads(), LoLDUConfig(rank=2, target_modules="all-linear"))
    by_name = loldu.inject(WithHeads(), LoLDUConfig(rank=2, target_modules=names))
    assert [n for n, _ in loldu.adapted_layers(by_kind)] == [n for n, _ in loldu.adapted_layers(by_name)] == names
    with_head = LoLDUConfig(rank=2, target_modules="all-linear", task_type="SEQ_CLS")
    assert all_linear(WithHeads(), with_head) == names


def test_all_linear_expands_an_adapted_model_as_its_base():
    config = LoLDUConfig(rank=2, target_modules="all-linear", task_type="SEQ_CLS")
    model = loldu.inject(WithHeads(), config)
    assert all_linear(model, config) == ["q", "k", "v"]
    selected = selector(model, config)
    assert selected("q") and not selected("q.base_layer") and not selected("lm_head")
    loldu.add_adapter(model, "b")  # the active adapter's config: 'all-linear' again
    assert loldu.adapter_names(model) == ["default", "b"]


def test_add_adapter_all_linear_must_cover_the_adapted_layers():
    model = loldu.inject(WithHeads(), LoLDUConfig(rank=2, target_modules=["q", "v"], task_type="SEQ_CLS"))
    with pytest.raises(AdapterError, match=r"loldu.add_adapter\('b'\): target_modules selects 'k', which has no LoLDU"):
        loldu.add_adapter(model, "b", LoLDUConfig(rank=2, target_modules="all-linear", task_type="SEQ_CLS"))
    head = loldu.inject(WithHeads(), LoLDUConfig(rank=2, target_modules=["q", "k", "v", "lm_head"], task_type="SEQ_CLS"))
    with pytest.raises(AdapterError, match="does not select LoLDU layer 'lm_head'"):
        loldu.add_adapter(head, "b", LoLDUConfig(rank=2, target_modules="all-linear", task_type="SEQ_CLS"))
    assert loldu.adapter_names(model) == loldu.adapter_names(head) == ["default"]


def test_the_adapter_file_still_says_all_linear(tmp_path):
    base = WithHeads()
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=2, target_modules="all-linear", task_type="SEQ_CLS"))
    loldu.save_adapter(model, tmp_path)
    _, config, _ = read_adapter(tmp_path)
    assert config.target_modules == "all-linear"
    loaded = loldu.load_adapter(base, tmp_path)
    assert [n for n, _ in loldu.adapted_layers(loaded)] == ["q", "k", "v"]
    loldu.load_adapter(model, tmp_path, "again")  # into the adapted model: the same layers
    assert loldu.adapter_names(model) == ["default", "again"]


def test_matches_answers_for_names_only():
    assert LoLDUConfig(rank=2, target_modules=["q"]).matches("x.q") and LoLDUConfig(rank=2, target_modules="q").matches("q")
    with pytest.raises(AdapterError, match="'all-linear' selects by module kind.*loldu.targets.selector"):
        LoLDUConfig(rank=2, target_modules="all-linear").matches("q")
