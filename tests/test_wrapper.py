"""LoLDUModel: PEFT's PeftModel surface, natively, on a small real transformers model."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import loldu
from loldu import AdapterError, LoLDUConfig, LoLDUModel

BERT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32, num_labels=2)


def base():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT)).eval()


def test_peft_surface(tmp_path, capsys):
    model = loldu.get_loldu_model(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                      train_scale=True))
    assert isinstance(model, LoLDUModel) and model.active_adapter == "default"
    assert model.config.num_labels == 2  # attributes of the wrapped model
    trainable, total = model.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    # z and sigma of 4 adapted layers (4 * (4 + 1)) plus the classifier (32 * 2 + 2)
    assert trainable == 4 * 5 + 66 and model.get_nb_trainable_parameters() == (trainable, total)
    ids = torch.randint(0, 40, (3, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            # the base modules' own forward vs the fused op at c == 0: two GEMM routes, bounded
            torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="safe_serialization"):
        model.save_pretrained(tmp_path / "x", safe_serialization=True)
    assert not (tmp_path / "x").exists()
    assert model.save_pretrained(tmp_path / "y", is_main_process=False) == {}  # another rank: writes nothing
    assert not (tmp_path / "y").exists()
    again = LoLDUModel.from_pretrained(base(), tmp_path)
    assert not any(p.requires_grad for p in again.parameters())  # PEFT's default: frozen for inference
    assert LoLDUModel.from_pretrained(base(), tmp_path, is_trainable=True).get_nb_trainable_parameters()[0] == trainable
    assert set(again.peft_config) == {"default"} and again.peft_config["default"].rank == 4
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, after)
        plain = again.merge_and_unload()
        assert not loldu.adapted_layers(plain)
        # merged weights compute the same function with another rounding: bounded, not exact
        torch.testing.assert_close(plain(input_ids=ids).logits, after, rtol=1e-4, atol=1e-5)


def test_wrapper_and_verbs_agree(tmp_path):
    wrapped = loldu.get_loldu_model(base(), LoLDUConfig(rank=2, target_modules=["query"]))
    # every loldu verb looks through the wrapper, and names layers as in the base model
    assert [n for n, _ in loldu.adapted_layers(wrapped)][0] == "bert.encoder.layer.0.attention.self.query"
    wrapped.add_adapter("b")
    wrapped.set_adapter("b")
    assert loldu.active_adapter(wrapped) == "b" and wrapped.active_adapters == ["b"]
    loldu.save_adapter(wrapped, tmp_path)
    wrapped.load_adapter(tmp_path, "c")
    assert loldu.adapter_names(wrapped) == ["default", "b", "c"]
    wrapped.delete_adapter("c")
    wrapped.merge_adapter()
    wrapped.unmerge_adapter()
    assert wrapped.unload() is wrapped.get_base_model() and not loldu.adapted_layers(wrapped)
