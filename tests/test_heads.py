"""Task heads (modules_to_save / task_type), target_modules='all-linear', PEFT spellings and warnings,
on small real transformers models built from their configs."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel

import loldu
from loldu import AdapterError, LoLDUConfig
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from loldu.errors import LolduWarning
from loldu.heads import SavedModule

BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32)


def bert_cls(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_labels=3, **BERT)).eval()


def other_head(seed: int) -> BertForSequenceClassification:
    """The same pretrained body (seed 0) with another freshly initialised head, as from_pretrained gives."""
    m = bert_cls(0)
    torch.manual_seed(seed)
    m.classifier.reset_parameters()
    return m


def batch():
    return torch.randint(0, 50, (4, 9)), torch.randint(0, 3, (4,))


def train(model, steps=3, lr=1e-2):
    opt = torch.optim.SGD(loldu.trainable_parameters(model), lr=lr)
    for _ in range(steps):
        ids, labels = batch()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_seq_cls_head_is_trained_saved_and_loaded(tmp_path):
    base = bert_cls(0)
    original_head = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    model = loldu.inject(base, LoLDUConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    assert isinstance(model.classifier, SavedModule)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.modules_to_save.default.bias" in trainable
    assert not any("original_module" in n for n in trainable)
    # all-linear: every encoder linear is adapted, the head (a saved module) is not
    names = [n for n, _ in loldu.adapted_layers(model)]
    assert "bert.encoder.layer.0.attention.self.query" in names and "bert.pooler.dense" in names
    assert not any(n.startswith("classifier") for n in names)
    train(model)
    head = model.classifier.modules_to_save["default"]
    assert not torch.equal(head.weight, original_head["weight"])  # the head trained
    assert torch.equal(model.classifier.original_module.weight, original_head["weight"])  # the original did not
    loldu.save_adapter(model, tmp_path)
    header, _, tensors = read_adapter(tmp_path)
    assert header["saved_modules"] == [{"name": "classifier", "tensors": ["weight", "bias"]}]
    assert torch.equal(tensors["saved.classifier.weight"], head.weight)
    # a fresh model with another random head reproduces the trained model's logits exactly
    fresh = loldu.load_adapter(other_head(1), tmp_path)
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference
    # merge_and_unload keeps the trained head; unload restores the original one
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = loldu.merge_and_unload(copy.deepcopy(model))
        assert isinstance(plain.classifier, nn.Linear) and torch.equal(plain.classifier.weight, head.weight)
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)  # merged: other rounding
        with loldu.disabled(model):
            off = model(input_ids=ids).logits
        back = loldu.unload(model)
        assert isinstance(back.classifier, nn.Linear) and torch.equal(back.classifier.weight, original_head["weight"])
        assert torch.equal(back(input_ids=ids).logits, off)


def test_each_adapter_has_its_own_head(tmp_path):
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    train(model)
    loldu.add_adapter(model, "b")
    loldu.set_adapter(model, "b")
    assert model.classifier.modules_to_save["b"].weight.requires_grad
    assert not model.classifier.modules_to_save["default"].weight.requires_grad
    assert torch.equal(model.classifier.modules_to_save["b"].weight, model.classifier.original_module.weight)
    train(model, lr=5e-2)
    ids, _ = batch()
    with torch.no_grad():
        out_b = model(input_ids=ids).logits
        loldu.set_adapter(model, "default")
        out_a = model(input_ids=ids).logits
    assert not torch.allclose(out_a, out_b)
    loldu.save_adapter(model, tmp_path / "b", "b")
    other = loldu.load_adapter(other_head(2), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, out_b)
    with pytest.raises(AdapterError, match="set_adapter"):
        loldu.merge(model, "b")  # the heads follow the active adapter
    with pytest.raises(AdapterError, match="modules_to_save"):
        with loldu.adapter_ids(model, ["b", "default", None, "b"]):
            pass


def test_head_errors_change_nothing(tmp_path):
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    loldu.save_adapter(train(model), tmp_path)
    torch.manual_seed(0)
    bare = BertModel(BertConfig(**BERT), add_pooling_layer=True)
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(AdapterError, match=r"prefix 'bert\.'.*BertForSequenceClassification.*not the bare BertModel"):
        loldu.load_adapter(bare, tmp_path)
    assert not loldu.adapted_layers(bare)
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in before.items())
    # a saved tensor of the wrong shape: refused before the model changes
    other = other_head(3)
    other.classifier = nn.Linear(32, 5)
    with pytest.raises(AdapterError, match=r"classifier.*\(5, 32\)|\(3, 32\)"):
        loldu.load_adapter(other, tmp_path)
    assert isinstance(other.classifier, nn.Linear) and not loldu.adapted_layers(other)
    # a saved module may not overlap an adapted layer
    with pytest.raises(AdapterError, match="overlaps"):
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], modules_to_save=["attention"]))


def test_saved_module_with_buffers_round_trips(tmp_path):
    """A saved module with running statistics and a 0-dim integer buffer (BatchNorm)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model = loldu.inject(net, LoLDUConfig(rank=3, target_modules=["0", "4"], modules_to_save=["1"]))
    opt = torch.optim.SGD(loldu.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    loldu.save_adapter(model, tmp_path)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    fresh[0].load_state_dict(model[0].base_layer.state_dict())
    fresh[4].load_state_dict(model[4].base_layer.state_dict())
    loldu.load_adapter(fresh, tmp_path).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert int(fresh[1].modules_to_save["default"].num_batches_tracked) == 3


def test_all_linear_leaves_the_lm_head_and_adapts_conv1d():
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    model = loldu.inject(gpt, LoLDUConfig(rank=2, target_modules="all-linear"))
    names = {n: layer.kind for n, layer in loldu.adapted_layers(model)}
    assert "lm_head" not in names
    assert names["transformer.h.0.attn.c_attn"] == "conv1d" and names["transformer.h.1.mlp.c_proj"] == "conv1d"
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_unmatched_entries_warn_with_a_suggestion():
    with pytest.warns(LolduWarning, match=r"'qurey' matches no module.*did you mean 'query'"):
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["qurey", "value"]))
    with pytest.warns(LolduWarning, match=r"modules_to_save entry 'classifer'.*'classifier'"):
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["value"], modules_to_save=["classifer"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry matches: no warning
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query", "value"]))


def test_peft_spellings():
    assert LoLDUConfig(r=5, target_modules=["q"]).rank == 5
    assert LoLDUConfig(rank=5, r=5, target_modules=["q"]).rank == 5
    with pytest.raises(AdapterError, match="disagree"):
        LoLDUConfig(rank=4, r=5, target_modules=["q"])
    with pytest.raises(AdapterError, match="positive int"):
        LoLDUConfig(r=0, target_modules=["q"])
    c = LoLDUConfig(r=3, target_modules=["q"], task_type="SEQ_CLS", form="dense")
    again = LoLDUConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.saved_modules == ["classifier", "score"]


def test_files_are_not_mistaken_for_peft_adapters(tmp_path):
    """PEFT's loaders look for adapter_config.json; a loldu adapter has none, so they refuse it cleanly
    instead of misreading it."""
    peft = pytest.importorskip("peft")
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    loldu.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftModel.from_pretrained(bert_cls(0), str(tmp_path))


def test_relative_parametrization(tmp_path):
    """c = (sigma / sigma0) D z with z from 0: starts as the base, z's gradient is D times c's, and the
    adapter saves, loads and merges like the paper's form."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    x = torch.randn(7, 16, dtype=torch.float64)
    want = net(x).detach()
    model = loldu.inject(copy.deepcopy(net), LoLDUConfig(rank=4, target_modules=["0", "2"], parametrization="relative",
                                                         train_scale=True, alpha=3.0))
    layer = model[0]
    assert torch.equal(layer.loldu_z["default"], torch.zeros(4, dtype=torch.float64))
    # c == 0 exactly; the fused op and nn.Linear may round the base matmul differently (another GEMM route)
    torch.testing.assert_close(model(x), want, rtol=1e-13, atol=1e-13)
    # the gradient of z is D times the gradient of c (float64 oracle: autograd through c itself)
    model(x).square().sum().backward()
    c = layer.coefficients("default").detach().requires_grad_(True)
    y = model[2](model[1](loldu.ops.adapter_linear(x, layer.base_matrix(), layer.bias, layer.loldu_PL, layer.loldu_U, c)))
    y.square().sum().backward()
    torch.testing.assert_close(layer.loldu_z["default"].grad, layer.loldu_D * c.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        # values an fp32 adapter file holds exactly (z and sigma are stored in fp32)
        layer.loldu_z["default"].copy_((torch.randn(4) * 0.1).double())
        layer.loldu_sigma["default"].fill_(1.75)
    torch.testing.assert_close(layer.coefficients("default"),
                               (1.75 / 0.75) * layer.loldu_D * layer.loldu_z["default"], rtol=1e-14, atol=0)
    loldu.save_adapter(model, tmp_path)
    again = loldu.load_adapter(copy.deepcopy(net), tmp_path)
    assert again[0].configs["default"].parametrization == "relative"
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        out = model(x)
        loldu.merge(model)
        torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)
    with pytest.raises(AdapterError, match="parametrization"):
        LoLDUConfig(rank=2, target_modules=["q"], parametrization="multiplicative")


def test_export_uses_the_exported_adapters_head(tmp_path):
    """to_onnx(adapter_name=...) exports that adapter's head (the model itself is untouched), and
    adapter_inputs=True, which would bake one head into a file meant for every adapter, is refused."""
    ort = pytest.importorskip("onnxruntime")  # noqa: F841
    import loldu.export as lx

    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    train(model)
    loldu.add_adapter(model, "b")
    loldu.set_adapter(model, "b")
    train(model, lr=5e-2)
    loldu.set_adapter(model, "default")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want_default = model(input_ids=ids).logits
        loldu.set_adapter(model, "b")
        want_b = model(input_ids=ids).logits
        loldu.set_adapter(model, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lx.to_onnx(model, {"input_ids": ids}, tmp_path / "b.onnx", adapter_name="b")
        out = lx.OrtRunner(tmp_path / "b.onnx").run({"input_ids": ids})["logits"]
    assert loldu.active_adapter(model) == "default"
    assert abs(torch.as_tensor(out) - want_b).max() <= 1e-4  # ORT vs PyTorch: the export's fp32 parity bound
    assert not torch.allclose(want_b, want_default, atol=1e-3)
    with pytest.raises(loldu.ExportError, match="task head"):
        lx.to_onnx(model, {"input_ids": ids}, tmp_path / "c.onnx", merge=False, adapter_inputs=True)
    assert not (tmp_path / "c.onnx").exists()


def test_cur_storage_exports_unmerged(tmp_path):
    """factor_storage='cur' layers export with merge=False too (the exporter's copy keeps PL and U;
    ONNX has no triangular solve), within the fp32 parity bound; the model keeps its storage."""
    pytest.importorskip("onnxruntime")
    import loldu.export as lx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 4)).eval()
    model = loldu.inject(net, LoLDUConfig(rank=4, target_modules=["0", "2"], factor_storage="cur"))
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            layer.loldu_z["default"].add_(torch.randn(4) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lx.to_onnx(model, torch.randn(2, 16), tmp_path / "m.onnx", merge=False,
                            check_inputs=torch.randn(5, 16))
    assert "parity" in str(report)
    assert all(layer.storage == "cur" for _, layer in loldu.adapted_layers(model))
    with pytest.raises(AdapterError, match="factor_storage"):
        loldu.add_adapter(model, "b", LoLDUConfig(rank=4, target_modules=["0", "2"]))


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.aux = self.head

    def forward(self, x):
        return self.aux(self.enc(x))


class _Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 4), nn.Linear(16, 2)])

    def forward(self, x):
        return self.heads[1](self.enc(x))


@pytest.mark.parametrize("make, saved, words", [
    (_Aliased, ["aux"], "also registered as 'head'"),
    (_Aliased, ["head"], "also registered as 'aux'"),
    (_Indexed, ["heads"], "container"),
])
def test_saved_modules_that_would_be_silently_wrong_are_refused(make, saved, words):
    torch.manual_seed(0)
    net = make()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(AdapterError, match=words):
        loldu.inject(net, LoLDUConfig(rank=2, target_modules=["enc"], modules_to_save=saved))
    assert not loldu.adapted_layers(net) and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    if make is _Indexed:  # naming the module inside the container works
        model = loldu.inject(net, LoLDUConfig(rank=2, target_modules=["enc"], modules_to_save=["heads.1"]))
        assert isinstance(model.heads[1], SavedModule) and model(torch.randn(3, 16)).shape == (3, 2)


def test_heads_must_be_the_same_for_every_adapter(tmp_path):
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"]))
    with pytest.raises(AdapterError, match="select 'classifier'.*do not save"):
        loldu.add_adapter(model, "b", LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert loldu.adapter_names(model) == ["default"]


def test_saved_tensor_of_another_dtype_is_refused(tmp_path):
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    loldu.save_adapter(train(model), tmp_path)
    other = other_head(1)
    other.classifier.double()
    with pytest.raises(AdapterError, match=r"'weight' is torch.float32 \(3, 32\) in the file but torch.float64"):
        loldu.load_adapter(other, tmp_path)
    assert not loldu.adapted_layers(other)


def test_trainable_parameters_outside_the_adapter_warn_at_save(tmp_path):
    model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loldu.save_adapter(model, tmp_path / "a")  # only the adapter and its head train: no warning
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.warns(LolduWarning, match="bert.embeddings.LayerNorm.weight"):
        loldu.save_adapter(model, tmp_path / "b")


def test_merge_and_unload_restores_the_heads_flags():
    base = bert_cls(0)
    base.classifier.weight.requires_grad_(False)
    model = loldu.inject(base, LoLDUConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    plain = loldu.merge_and_unload(model)
    assert not plain.classifier.weight.requires_grad and plain.classifier.bias.requires_grad


def test_all_linear_never_adapts_a_task_head():
    """A fresh classifier has nothing to factorize: 'all-linear' leaves it out, and warns when nothing
    trains it (no task_type / modules_to_save)."""
    with pytest.warns(LolduWarning, match=r"leaves the task head 'classifier' out.*task_type='SEQ_CLS'"):
        model = loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules="all-linear"))
    assert not any(n.startswith("classifier") for n, _ in loldu.adapted_layers(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules="all-linear", task_type="seq_cls"))


def test_config_mistakes_are_explained():
    with pytest.raises(AdapterError, match=r"'qeury' matches no module.*did you mean 'query'"):
        loldu.inject(bert_cls(0), LoLDUConfig(rank=2, target_modules=["qeury"]))
    with pytest.raises(AdapterError, match="all-linear"):
        LoLDUConfig(rank=2)
    with pytest.raises(AdapterError, match="task_type.*SEQ_CLS"):
        LoLDUConfig(rank=2, target_modules=["q"], task_type="BOGUS")
    assert LoLDUConfig(rank=2, target_modules=["q"], task_type="seq_cls").task_type == "SEQ_CLS"
