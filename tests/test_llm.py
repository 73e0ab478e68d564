"""Causal LMs with LoLDU adapters on every linear: generation (KV cache, per-row adapters), merge, the
merged model through save_pretrained / from_pretrained, activation checkpointing, bf16 autocast on CPU,
and the mixture-of-experts weights 'all-linear' cannot adapt. Tiny random Llama, GPT-2 and Mixtral
configs (_llm_helpers: why tokens are compared only where the logits' margins are clear)."""
import copy
import warnings

import pytest
import torch
from _llm_helpers import (
    MODELS,
    assert_same_where_clear,
    bound_for,
    check_trajectory,
    generate,
    logits_along,
    prompts,
    train_like,
)

import loldu
from loldu.errors import LolduWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(kind, rank=8, **kwargs):
    model = MODELS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LolduWarning)  # Mixtral's experts (test_moe_experts_left_out_are_named)
        loldu.inject(model, loldu.LoLDUConfig(rank=rank, target_modules="all-linear", **kwargs))
    return train_like(model)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_generate_with_cache_equals_full_recompute(kind):
    model = adapted(kind)
    ids = prompts()
    tokens, logits = generate(model, ids)
    ref = logits_along(model, ids, tokens)  # no cache: every step recomputed from the whole sequence
    bound = bound_for(ref)
    rows = check_trajectory(tokens, logits, ref, bound)
    no_cache, _ = generate(model, ids, use_cache=False)
    assert_same_where_clear(tokens, no_cache, rows)
    with loldu.disabled(model):
        base = logits_along(model, ids, tokens)
    assert float((base - ref).abs().max()) > 100 * bound  # the adapter is in the computation


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_two_adapters_in_one_batch(kind):
    """adapter_ids: row i generates as adapter ids[i] alone would (None: the base model)."""
    model = adapted(kind)
    loldu.add_adapter(model, "other")
    train_like(model, "other")
    ids = prompts(batch=4)
    names = ["default", "other", None, "other"]
    with loldu.adapter_ids(model, names):
        tokens, logits = generate(model, ids)
    for name in set(names):
        rows = torch.tensor([n == name for n in names])
        if name is None:
            with loldu.disabled(model):
                ref = logits_along(model, ids, tokens)
                alone, _ = generate(model, ids)
        else:
            loldu.set_adapter(model, name)
            ref = logits_along(model, ids, tokens)
            alone, _ = generate(model, ids)
        clear = check_trajectory(tokens[rows], logits[rows], ref[rows], bound_for(ref))
        assert_same_where_clear(tokens[rows], alone[rows], clear)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_merged_generates_the_unmerged_tokens(kind):
    """Merged (W0 + ΔW rounded to fp32) and unmerged (W0 x + the branch) are two computations: logits
    within the bound, tokens equal where the margins are clear."""
    model = adapted(kind)
    ids = prompts()
    tokens, logits = generate(model, ids)
    loldu.merge(model)
    merged_tokens, merged_logits = generate(model, ids)
    loldu.unmerge(model)
    ref = logits_along(model, ids, merged_tokens)
    rows = check_trajectory(merged_tokens, merged_logits, ref, bound_for(ref))
    assert_same_where_clear(merged_tokens, tokens, rows)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_save_pretrained_from_pretrained(kind, tmp_path):
    """The merged plain model saved by transformers loads back with AutoModelForCausalLM (no loldu), and
    generates exactly the tokens the merged model did (the same weights, the same computation)."""
    from transformers import AutoModelForCausalLM

    model = adapted(kind)
    ids = prompts()
    tokens, _ = generate(model, ids)
    unmerged = copy.deepcopy(model)
    plain = loldu.merge_and_unload(model)
    merged_tokens, merged_logits = generate(plain, ids)
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(plain) and not any("loldu" in k for k in loaded.state_dict())
    loaded.generation_config.eos_token_id = None
    loaded_tokens, loaded_logits = generate(loaded, ids)
    assert torch.equal(loaded_tokens, merged_tokens) and torch.equal(loaded_logits, merged_logits)
    # Against the unmerged adapter it was merged from: the bound-and-margin argument.
    ref = logits_along(unmerged, ids, merged_tokens)
    rows = check_trajectory(merged_tokens, merged_logits, ref, bound_for(ref))
    assert_same_where_clear(merged_tokens, tokens, rows)


def _checkpointing(model, on: bool):
    verb = "enable" if on else "disable"
    fn = getattr(model, f"activation_checkpointing_{verb}", None) or getattr(model, f"gradient_checkpointing_{verb}")
    fn()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = adapted(kind).train()
    ids = prompts(batch=2, length=9)
    calls = []
    first = loldu.adapted_layers(model)[0][1]
    first.register_forward_hook(lambda *a: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return [layer.loldu_z["default"].grad.clone() for _, layer in loldu.adapted_layers(model)], len(calls)

    plain, n_plain = grads()
    _checkpointing(model, True)
    try:
        ckpt, n_ckpt = grads()
    finally:
        _checkpointing(model, False)
    assert n_plain == 1 and n_ckpt == 2  # the checkpointed layer ran again in the backward
    peak = max(float(g.abs().max()) for g in plain)
    assert peak > 0
    # The recomputed forward is the same computation; the bound allows a reduction in another order.
    for a, b in zip(plain, ckpt):
        assert float((a - b).abs().max()) <= 1e-5 * peak


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_autocast_on_cpu_trains(kind):
    """Under torch.autocast('cpu', bfloat16) the base runs in bf16, the adapter's z, its gradient and the
    optimizer's state stay fp32, the loss is finite and decreases on a fixed batch, z moves."""
    model = adapted(kind, rank=4).train()
    ids = prompts(batch=4, length=8)
    params = loldu.trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    for _, layer in loldu.adapted_layers(model):
        assert layer.base_layer.weight.dtype == torch.float32  # autocast casts per op, never the weights


def test_moe_experts_left_out_are_named():
    """transformers 5 keeps a Mixtral block's experts as two 3-D parameters (MixtralExperts), no nn.Linear:
    'all-linear' adapts attention only, and says so, with the experts' share of the model."""
    model = MODELS["mixtral"]()
    experts = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 3}
    assert experts, "the tiny Mixtral should hold stacked expert weights"
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(LolduWarning) as record:
        loldu.inject(model, loldu.LoLDUConfig(rank=4, target_modules="all-linear"))
    text = " ".join(str(w.message) for w in record if "stacked" in str(w.message))
    assert "MixtralExperts" in text and next(iter(experts)) in text
    assert f"{100 * sum(experts.values()) / total:.1f}%" in text
    assert record[0].filename == __file__  # points at the caller's inject
    names = [n for n, _ in loldu.adapted_layers(model)]
    assert names and all(".self_attn." in n for n in names)
    tokens, _ = generate(train_like(model), prompts())  # the adapted attention still generates
    assert tokens.shape == (3, 6)


def test_dense_llama_has_no_expert_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LolduWarning)
        loldu.inject(MODELS["llama"](), loldu.LoLDUConfig(rank=4, target_modules="all-linear"))


def test_loldu_model_handle_generates_and_checkpoints():
    """PEFT's surface (LoLDUModel): generate, activation checkpointing and merge_and_unload reach the
    wrapped causal LM; generating through the handle is the same computation as through the model."""
    model = MODELS["llama"]()
    handle = loldu.get_loldu_model(model, loldu.LoLDUConfig(rank=4, target_modules="all-linear"))
    train_like(handle)
    ids = prompts()
    tokens, logits = generate(handle, ids)
    same_tokens, same_logits = generate(model, ids)
    assert torch.equal(tokens, same_tokens) and torch.equal(logits, same_logits)
    _checkpointing(handle, True)
    handle.train()
    handle(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.loldu_z["default"].grad is not None for _, layer in loldu.adapted_layers(handle))
    _checkpointing(handle, False)
    plain = handle.eval().merge_and_unload()
    assert plain is model and not loldu.adapted_layers(plain)


@pytest.mark.parametrize("kind,key", [("llama", "down_proj"), ("gpt2", "mlp.c_proj"), ("mixtral", "o_proj")])
def test_full_rank_with_rank_pattern_generates_and_merges(kind, key):
    """rank='full' (min(d, k) per layer) with one rank_pattern override: the ranks follow, and the cached,
    merged and unmerged computations agree as above."""
    model = adapted(kind, rank="full", rank_pattern={key: 6})
    for name, layer in loldu.adapted_layers(model):
        want = 6 if name.endswith(key) else min(layer.base_layer.weight.shape)
        assert layer.rank == want, (name, layer.rank, want)
    ids = prompts()
    tokens, logits = generate(model, ids)
    ref = logits_along(model, ids, tokens)
    assert_same_where_clear(tokens, generate(model, ids, use_cache=False)[0],
                            check_trajectory(tokens, logits, ref, bound_for(ref)))
    loldu.merge(model)
    merged_tokens, merged_logits = generate(model, ids)
    loldu.unmerge(model)
    ref = logits_along(model, ids, merged_tokens)
    assert_same_where_clear(merged_tokens, tokens, check_trajectory(merged_tokens, merged_logits, ref, bound_for(ref)))
