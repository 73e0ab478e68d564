"""The paths a PEFT user takes first: the plain transformers Trainer, PEFT's keyword names, the
suggested learning rate, and the small refusals of the CLI (docs/trainer.md, docs/install.md).

Tiny BERTs built from config (2 layers, hidden 32) on the CPU, a few optimizer steps each.
"""
import inspect
import pickle

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import loldu
from loldu import AdapterError, LoLDUConfig, LoLDUModel
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from loldu.trainer import LoLDUTrainer

BERT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32, num_labels=2)
WORDS = [f"w{i}" for i in range(35)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base(head_seed=0):
    """The same encoder every call; the classifier head drawn from `head_seed` (a new head per load)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT)).eval()
    torch.manual_seed(head_seed)
    model.classifier.reset_parameters()
    return model


def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def texts(n=24):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 8, (), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[i] for i in idx), "label": int(sum(idx) % 2), "id": len(rows)})
    return rows


def encoded(tok, rows):
    """Dataset rows with extra columns (text, id) that remove_unused_columns must drop by the signature."""
    return [{**r, **tok(r["text"])} for r in rows]


def targs(out, **kw):
    kw = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": [],
          "use_cpu": True, "disable_tqdm": True, "logging_steps": 100, **kw}
    return TrainingArguments(str(out), **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- 1. the plain transformers Trainer ------------------------------------------------------------------

def test_wrapper_shows_the_wrapped_signature():
    w = loldu.get_loldu_model(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    params = inspect.signature(w.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)  # what Trainer keeps of a dataset
    from transformers.utils import find_labels
    assert find_labels(type(w)) == ["labels"] and isinstance(w, LoLDUModel)
    ids = torch.randint(0, 40, (3, 7))
    copy = pickle.loads(pickle.dumps(w))
    assert type(copy) is type(w) and torch.equal(logits(copy, ids), logits(w, ids))


def test_plain_trainer_refused_before_training_wrapper(tmp_path):
    tok = tokenizer(tmp_path)
    data = encoded(tok, texts())
    w = loldu.get_loldu_model(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in w.named_parameters()}
    trainer = Trainer(model=w, args=targs(tmp_path / "out"), train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorWithPadding(tok))
    # Evaluation needs no saving: the plain Trainer feeds the columns of the wrapped model's signature.
    assert trainer.evaluate()["eval_loss"] > 0
    with pytest.raises(AdapterError, match=r"loldu\.trainer\.LoLDUTrainer"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in w.named_parameters())
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.xfail(reason="needs the refusal hook in the injected model (loldu.model / LoLDULayer.train)",
                   strict=False)
def test_plain_trainer_refused_before_training_injected(tmp_path):
    tok = tokenizer(tmp_path)
    model = loldu.inject(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=targs(tmp_path / "out"), train_dataset=encoded(tok, texts()),
                      data_collator=DataCollatorWithPadding(tok))
    with pytest.raises(AdapterError, match=r"loldu\.trainer\.LoLDUTrainer"):
        trainer.train()


@pytest.mark.parametrize("how", ["wrapper", "injected"])
def test_loldu_trainer_adapter_checkpoints_reload(tmp_path, how):
    tok = tokenizer(tmp_path)
    config = LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", train_scale=True)
    model = loldu.get_loldu_model(base(), config) if how == "wrapper" else loldu.inject(base(), config)
    ids = torch.randint(5, 40, (6, 9))
    start = logits(model, ids)
    out = tmp_path / "out"
    trainer = LoLDUTrainer(model=model, args=targs(out), train_dataset=encoded(tok, texts()),
                           data_collator=DataCollatorWithPadding(tok))  # the tokenizer only via the collator
    trainer.train()
    trainer.save_model()
    model.eval()
    trained = logits(model, ids)
    assert not torch.allclose(trained, start)
    for d in (out / "checkpoint-2", out / "checkpoint-4", out):
        names = {p.name for p in d.iterdir()}
        assert {WEIGHTS_NAME, CONFIG_NAME, "tokenizer.json", "tokenizer_config.json"} <= names, names
        assert "model.safetensors" not in names and "config.json" not in names
        assert (d / WEIGHTS_NAME).stat().st_size < 20_000  # z, sigma, pivots and a 32 x 2 head: not the model
    # The output loads onto a fresh base (another random head) and reproduces the trained model.
    fresh = loldu.load_adapter(base(head_seed=1), out)
    torch.testing.assert_close(logits(fresh, ids), trained, rtol=0, atol=0)
    again = LoLDUModel.from_pretrained(base(head_seed=2), out / "checkpoint-4")
    torch.testing.assert_close(logits(again, ids), trained, rtol=0, atol=0)
