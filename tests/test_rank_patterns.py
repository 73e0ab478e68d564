"""Per-layer ranks: rank="full" (min(d, k) of each layer, the paper's default; Shi et al., arXiv
2410.13618) and PEFT's rank_pattern / alpha_pattern, through inject, add_adapter, the adapter file
(format 4: z and pivots concatenated, each layer entry with its rank), the C++ merge and the
factor_storage="lu" store. A tiny random Llama: hidden 64, MLP 96, grouped-query k/v 32 wide, so
its layers have three different min(d, k).
"""
import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cpp_embedding import FUZZ_CASES, app, max_rel, run  # noqa: F401  (app: the fixture that builds apply_adapter)

import loldu
from loldu import AdapterError, LoLDUConfig, spec
from loldu.adapter_io import read_adapter
from loldu.cli import inspect_adapter
from loldu.layer import LoLDULayer, weight_matrix

transformers = pytest.importorskip("transformers")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=None):
    torch.manual_seed(torch.randint(0, 2**31, ()).item() if seed is None else seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n=3, t=9):
    return torch.randint(0, 101, (n, t))


def layers(model):
    return dict(loldu.adapted_layers(model))


def randomize(model, scale=0.2):
    """Trained-looking z and sigma: fresh random values away from c = 0."""
    with torch.no_grad():
        for _, m in loldu.adapted_layers(model):
            for name in m.loldu_z:
                z = m.loldu_z[name]
                z.add_(scale * torch.randn_like(z) * (z.abs() + 0.1))
                m.loldu_sigma[name].mul_(1 + 0.2 * torch.randn(()).item())


def test_full_rank_is_min_d_k_of_each_layer_and_starts_at_the_base():
    base = tiny_llama()
    x = tokens()
    with torch.no_grad():
        y0 = base(x).logits
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank="full", target_modules="all-linear", alpha=3.0))
    got = layers(model)
    assert len(got) == 2 * len(LINEARS)
    widths = set()
    for name, layer in got.items():
        d, k = weight_matrix(base.get_submodule(name)).shape
        assert layer.rank == min(d, k) and layer.loldu_pivots.shape == (min(d, k),), name
        # sigma0 = alpha / r of the layer, rounded to fp32
        assert layer.sigma0["default"] == float(torch.tensor(3.0 / min(d, k), dtype=torch.float32)), name
        widths.add(min(d, k))
    assert widths == {32, 64}  # k/v (32 x 64) and the rest
    with torch.no_grad():
        y = model(x).logits
    # c == 0 exactly at init; the adapted forward may take another GEMM route than the base (bounded)
    assert (y - y0).abs().max() <= 1e-5 * y0.abs().max()


def test_rank_pattern_and_alpha_pattern_per_module():
    base = tiny_llama()
    config = LoLDUConfig(rank=4, target_modules=LINEARS, alpha=2.0,
                         rank_pattern={r"model\.layers\.\d+\.self_attn\.(k|v)_proj": "full", "layers.1.mlp.down_proj": 16,
                                       "down_proj": 8, "model.layers.0.self_attn.q_proj": 2, "q_proj": 6},
                         alpha_pattern={"mlp.gate_proj": 5.0, r".*\.o_proj": 0.5})
    model = loldu.inject(copy.deepcopy(base), config)

    def want(name):
        leaf = name.rpartition(".")[2]
        r = {"k_proj": 32, "v_proj": 32, "down_proj": 16 if ".1." in name else 8}.get(leaf, 4)
        if leaf == "q_proj":  # an exact name wins over the earlier suffix key
            r = 2 if name.startswith("model.layers.0.") else 6
        alpha = {"gate_proj": 5.0, "o_proj": 0.5}.get(leaf, 2.0)
        return r, float(torch.tensor(alpha / r, dtype=torch.float32))

    for name, layer in layers(model).items():
        r, s0 = want(name)
        assert (layer.rank, layer.sigma0["default"]) == (r, s0), name
        assert config.rank_for(name, tuple(weight_matrix(base.get_submodule(name)).shape)) == r
        assert config.scale_for(name, r) == s0
    # The pattern travels with the config (and back)
    assert LoLDUConfig.from_dict(config.to_dict()) == config
    with pytest.raises(AdapterError, match="differs per layer"):
        _ = config.initial_scale


def test_save_load_round_trip_is_exact_and_the_file_is_ragged(tmp_path):
    base = tiny_llama()
    config = LoLDUConfig(rank="full", target_modules="all-linear", rank_pattern={"down_proj": 5},
                         alpha_pattern={"q_proj": 4.0}, parametrization="relative", train_scale=True)
    model = loldu.inject(copy.deepcopy(base), config)
    randomize(model)
    x = tokens()
    with torch.no_grad():
        y = model(x).logits
    loldu.save_adapter(model, tmp_path)
    stored = read_adapter(tmp_path)
    want_ranks = [layer.rank for _, layer in loldu.adapted_layers(model)]
    assert stored.header["format_version"] == spec.FORMAT_VERSION == 4
    assert stored.ranks == want_ranks and len(set(want_ranks)) == 3  # 64, 32 and 5
    assert stored.tensors["z"].shape == (sum(want_ranks),) and stored.tensors["pivots"].shape == (sum(want_ranks),)
    for i, (_, layer) in enumerate(loldu.adapted_layers(model)):
        assert torch.equal(stored.layer(i)["z"], layer.loldu_z["default"].detach())
        assert torch.equal(stored.layer(i)["pivots"], layer.loldu_pivots.cpu())
    loaded = loldu.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        y2 = loaded(x).logits
    assert torch.equal(y2, y)  # the same factors, values and computation
    info = inspect_adapter(tmp_path)
    assert [e["rank"] for e in info["layers"]] == want_ranks and info["sigma0"] is None


def test_add_adapter_needs_the_same_rank_per_layer_however_spelled():
    model = loldu.inject(tiny_llama(), LoLDUConfig(rank="full", target_modules=LINEARS))
    # rank 64 with k/v at 32 is rank="full" on this model, spelled another way
    loldu.add_adapter(model, "same", LoLDUConfig(rank=64, target_modules=LINEARS, rank_pattern={"k_proj": 32,
                                                                                              "v_proj": 32}))
    assert loldu.adapter_names(model) == ["default", "same"]
    with pytest.raises(AdapterError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj' \(32, 64\) would have rank 8 "
                                           "but its frozen factors have rank 32"):
        loldu.add_adapter(model, "other", LoLDUConfig(rank="full", target_modules=LINEARS, rank_pattern={"k_proj": 8}))
    assert loldu.adapter_names(model) == ["default", "same"]


def test_lu_store_at_full_rank_on_llama(tmp_path):
    base = tiny_llama()
    full = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank="full", target_modules="all-linear"))
    lu = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank="full", target_modules="all-linear", factor_storage="lu"))
    assert all(layer.storage == "lu" for _, layer in loldu.adapted_layers(lu))
    randomize(full)
    with torch.no_grad():
        for (_, a), (_, b) in zip(loldu.adapted_layers(full), loldu.adapted_layers(lu)):
            b.loldu_z["default"].copy_(a.loldu_z["default"])
            b.loldu_sigma["default"].copy_(a.loldu_sigma["default"])
    x = tokens()
    with torch.no_grad():
        y_full, y_lu = full(x).logits, lu(x).logits
    # the same W(c), computed from PL, U (full) or from the packed LU (lu): bounded, not bit-compared
    assert (y_lu - y_full).abs().max() <= 1e-4 * y_full.abs().max()
    loldu.save_adapter(lu, tmp_path)
    again = loldu.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert (again(x).logits - y_full).abs().max() <= 1e-4 * y_full.abs().max()
    # lu needs every layer at full rank: a pattern below it is refused, naming the layer
    with pytest.raises(AdapterError, match=r"k_proj.*rank must be min\(d, k\) = 32"):
        loldu.inject(copy.deepcopy(base), LoLDUConfig(rank="full", target_modules=LINEARS, factor_storage="lu",
                                                      rank_pattern={"k_proj": 8}))


def test_cpp_merge_of_a_ragged_adapter_equals_python_merge(app, tmp_path):  # noqa: F811
    base = tiny_llama()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    config = LoLDUConfig(rank="full", target_modules=LINEARS, rank_pattern={"o_proj": 7, "up_proj": 3},
                         alpha_pattern={"gate_proj": 6.0}, train_scale=True)
    model = loldu.inject(copy.deepcopy(base), config)
    randomize(model)
    loldu.save_adapter(model, tmp_path / "adapter")
    out = run(app, "--check", tmp_path / "adapter").stdout
    assert "format 4, ranks 3 to 64" in out and "o_proj: linear (64, 64) float32, rank 7" in out
    want = {f"{n}.weight": m.base_layer.weight.detach().clone()
            for n, m in loldu.merge(loldu.load_adapter(copy.deepcopy(base), tmp_path / "adapter")).named_modules()
            if isinstance(m, LoLDULayer)}
    run(app, tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
    got, original = load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "base.safetensors")
    assert len(want) == 2 * len(LINEARS)
    for key, w in want.items():
        # same formula on both sides, separate runs of the factorization and GEMMs: bounded (fp32)
        assert max_rel(got[key], w) <= 1e-6, key
        assert not torch.equal(got[key], original[key]), key


def test_cpp_writes_a_full_rank_adapter_python_loads(app, tmp_path):  # noqa: F811
    base = tiny_llama()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    names = [f"model.layers.{i}.self_attn.{p}:linear" for i in range(2) for p in ("q_proj", "k_proj")]
    out = run(app, "--create", tmp_path / "base.safetensors", tmp_path / "adapter", "--rank", "full", "--seed", 5,
              *names).stdout
    assert "(4 layers, ranks 32 to 64)" in out
    stored = read_adapter(tmp_path / "adapter")
    assert stored.config.rank == "full" and stored.ranks == [64, 32, 64, 32]
    model = loldu.load_adapter(copy.deepcopy(base), stored)
    assert [layer.rank for _, layer in loldu.adapted_layers(model)] == [64, 32, 64, 32]


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank="Full"), "rank must be a positive int or 'full'"),
    (dict(rank=0), "rank must be a positive int or 'full'"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int or 'full', got 0"),
    (dict(rank_pattern={"q_proj": "FULL"}), r"rank_pattern\['q_proj'\] must be"),
    (dict(rank_pattern={"q_proj": 2.0}), r"rank_pattern\['q_proj'\] must be"),
    (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be"),
    (dict(rank_pattern={"": 2}), "rank_pattern keys must be non-empty module names"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern must be None or a dict"),
    (dict(alpha_pattern={"q_proj": 0}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\] must be a finite nonzero number"),
    (dict(alpha_pattern={"q_proj": 2.0}, sigma0=0.1), "alpha_pattern cannot be combined with sigma0"),
    (dict(alpha_pattern={"q_proj": 1e-45}), r"sigma0 = alpha / rank = 1e-45 / 8 is 0.0 in float32"),
])
def test_bad_patterns_are_refused_by_the_config(kwargs, words):
    with pytest.raises(AdapterError, match=words):
        LoLDUConfig(target_modules=LINEARS, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    # a key that selects no target: PEFT ignores it; a typo would silently keep the default rank
    (dict(rank_pattern={"kproj": 2}), "rank_pattern key 'kproj' selects none of the 14 adapted layers.*'k_proj'"),
    (dict(alpha_pattern={"lm_head": 2.0}), "alpha_pattern key 'lm_head' selects none of the 14 adapted layers"),
    # a key shadowed by an earlier one for every layer it matches
    (dict(rank_pattern={".*proj": 2, "q_proj": 3}), "rank_pattern key 'q_proj' selects none.*an earlier key"),
    (dict(rank_pattern={"k_proj": 33}), r"layer 'model\.layers\.0\.self_attn\.k_proj': rank_pattern\['k_proj'\] = 33 "
                                        r"exceeds min\(d, k\) = 32 of its linear weight viewed as \(32, 64\)"),
    # a regular expression matches a whole name ('mlp.*' matches none; '.*mlp.*' would)
    (dict(rank=40, rank_pattern={"mlp.*": "full", ".*_proj": 4}), r"rank_pattern key 'mlp\.\*' selects none"),
    (dict(rank="full", alpha=1e-40), r"layer 'model\.layers\.0\.self_attn\.q_proj': sigma0 = alpha / rank = 1e-40 / 64"),
])
def test_bad_patterns_are_refused_at_inject_and_the_model_is_unchanged(kwargs, words):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=words):
        loldu.inject(model, LoLDUConfig(**{"target_modules": "all-linear", **kwargs}))
    assert not loldu.adapted_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_old_format_files_still_read(tmp_path):
    """Formats 2 and 3 (one rank, z and pivots (L, r)) read as format 4 does: ranks in the layer
    entries, z and pivots concatenated; such a file cannot carry per-layer ranks."""
    for version in (2, 3):
        d = tmp_path / str(version)
        d.mkdir()
        shutil.copy(FUZZ_CASES / f"accept-v{version}-linear-embedding-conv2d.safetensors", d / spec.WEIGHTS_NAME)
        with pytest.warns(loldu.adapter_io.AdapterWarning):  # no readable copy beside it
            stored = read_adapter(d)
        assert stored.header["format_version"] == version
        r = stored.config.rank
        raw = load_file(d / spec.WEIGHTS_NAME)
        assert raw["z"].dim() == 2 and stored.ranks == [r] * raw["z"].shape[0]
        for i in range(len(stored.ranks)):
            assert torch.equal(stored.layer(i)["z"], raw["z"][i].float())
            assert torch.equal(stored.layer(i)["pivots"], raw["pivots"][i].long())


@pytest.mark.parametrize("key", [r".*(?<!q)_proj", "(?i).*V_PROJ", r".*v_proj\Z", r".*layers\.[01]{,1}\.v_proj",
                                 "q_proj++", "(?P<n>q)_proj", "[[:alpha:]]_proj", r"\Aq_proj", "("])
@pytest.mark.parametrize("option", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_the_cpp_reader_would_read_otherwise_are_refused(key, option):
    """A key whose regular-expression syntax Python and C++ (std::regex, which re-resolves each layer's rank
    and scale from the saved config) read differently is refused when the config is made."""
    with pytest.raises(AdapterError, match=f"{option} key"):
        LoLDUConfig(rank=4, target_modules=["q_proj"], **{option: {key: 2}})


@pytest.mark.parametrize("key", ["q_proj", r".*\.v_proj", r".*layers\.[01]\.self_attn\.(k|v)_proj", r"layers\.\d+\..*",
                                 "(?:q|k)_proj", "[a-z_]+proj", ".*?_proj", "a{1,3}"])
def test_portable_pattern_keys_are_accepted(key):
    assert LoLDUConfig(rank=4, target_modules=["q_proj"], rank_pattern={key: 2}).rank_pattern == {key: 2}
