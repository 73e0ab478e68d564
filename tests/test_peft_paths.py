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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_plain_trainer_refused_before_training_injected(tmp_path):
    tok = tokenizer(tmp_path)
    model = loldu.inject(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=targs(tmp_path / "out"), train_dataset=encoded(tok, texts()),
                      data_collator=DataCollatorWithPadding(tok))
    with pytest.raises(AdapterError, match=r"loldu\.trainer\.LoLDUTrainer"):
        trainer.train()


def test_plain_trainer_check_on_an_injected_model(tmp_path):
    """The mechanism the injected path needs (loldu.wrapper.arm_plain_trainer_check), armed by hand."""
    from loldu.wrapper import arm_plain_trainer_check

    tok = tokenizer(tmp_path)
    data = encoded(tok, texts())
    model = loldu.inject(base(), LoLDUConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    handle = arm_plain_trainer_check(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match=r"loldu\.trainer\.LoLDUTrainer"):
        Trainer(model=model, args=targs(tmp_path / "out"), train_dataset=data,
                data_collator=DataCollatorWithPadding(tok)).train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    LoLDUTrainer(model=model, args=targs(tmp_path / "ok", max_steps=1, save_steps=1), train_dataset=data,
                 data_collator=DataCollatorWithPadding(tok)).train()  # the mixin passes
    model.train()
    model(input_ids=torch.randint(5, 40, (2, 6)))  # a training forward outside any Trainer passes too
    handle.remove()


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


# -- 3. PEFT's keywords ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,says", [
    ({"lora_alpha": 16}, r"alpha= .*sigma0 = alpha / r"), ({"lora_dropout": 0.1}, "no adapter dropout"),
    ({"bias": "none"}, "modules_to_save"), ({"inference_mode": False}, "is_trainable"),
    ({"init_lora_weights": True}, "c = 0"), ({"use_dora": True}, "no DoRA"), ({"use_rslora": True}, "sigma0"),
    ({"fan_in_fan_out": True}, "Conv1D"), ({"target_parameters": ["w"]}, "not bare parameters"),
    ({"module_to_save": ["classifier"]}, "did you mean modules_to_save"), ({"nonsense": 1}, "not an option")])
def test_peft_keywords_name_the_loldu_equivalent(kw, says):
    with pytest.raises(AdapterError, match=says) as e:
        LoLDUConfig(r=4, target_modules=["query"], **kw)
    assert next(iter(kw)) in str(e.value) and "layers_to_transform" in str(e.value)  # the options are listed


def _names(n_layers=4):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": n_layers}))
    return model, [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("targets,layers,pattern", [
    (["query", "value"], 1, None), (["query", "value"], [0, 3], "layer"), (["dense"], [2], ["layers", "layer"]),
    (["key"], [5], None), (["query"], [1, 2], "nomatch")])
def test_layers_to_transform_selects_as_peft(targets, layers, pattern):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    model, names = _names()
    peft_cfg = LoraConfig(r=2, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    expected = [n for n in names if n and check_target_module_exists(peft_cfg, n)]
    config = LoLDUConfig(r=2, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert [n for n in names if n and config.matches(n) and config.in_layers(n)] == expected
    if not expected:
        return
    loldu.inject(model, config)
    assert [n for n, _ in loldu.adapted_layers(model)] == expected


def test_layers_to_transform_with_all_linear_round_trips(tmp_path):
    model, _ = _names()
    config = LoLDUConfig(r=2, target_modules="all-linear", layers_to_transform=[0, 2], task_type="SEQ_CLS")
    loldu.inject(model, config)
    got = [n for n, _ in loldu.adapted_layers(model)]
    assert got and all(".layer.0." in n or ".layer.2." in n for n in got) and len(got) == 2 * 6
    loldu.save_adapter(model, tmp_path)
    fresh, _ = _names()
    loldu.load_adapter(fresh, tmp_path)
    assert [n for n, _ in loldu.adapted_layers(fresh)] == got
    from loldu.adapter_io import read_adapter
    assert read_adapter(tmp_path).config.layers_to_transform == [0, 2]


@pytest.mark.parametrize("kw,says", [
    ({"layers_pattern": "layer"}, "without layers_to_transform"), ({"layers_to_transform": [-1]}, "ints in"),
    ({"layers_to_transform": [True]}, "ints in"), ({"layers_to_transform": 1, "target_modules": r".*query"}, "regex"),
    ({"layers_to_transform": 1, "layers_pattern": "("}, "regular expression")])
def test_layer_options_refused(kw, says):
    with pytest.raises(AdapterError, match=says):
        LoLDUConfig(**{"r": 2, "target_modules": ["query"], **kw})


# -- 4. the suggested learning rate -------------------------------------------------------------------

def test_suggested_lr_is_printed_with_the_parameter_counts(capsys):
    for param in ("paper", "relative"):
        config = LoLDUConfig(r=4, target_modules=["query"], parametrization=param)
        assert config.suggested_lr == 1e-2  # docs/evaluation.md, "Choosing the defaults"
    # the relative form's step grows with the rank (1e-2 diverged at full rank on every linear)
    assert LoLDUConfig(r=64, target_modules=["query"], parametrization="relative").suggested_lr == 1e-3
    assert LoLDUConfig(rank="full", target_modules=["query"], parametrization="relative").suggested_lr == 1e-4
    assert LoLDUConfig(rank="full", target_modules=["query"]).suggested_lr == 1e-2
    loldu.get_loldu_model(base(), LoLDUConfig(r=4, target_modules=["query"])).print_trainable_parameters()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trainable params:") and out[1].startswith("suggested learning rate: 0.01")


# -- 5. small refusals and hints ----------------------------------------------------------------------

def test_regex_target_matching_nothing_says_whole_name():
    with pytest.raises(AdapterError, match=r"must match a whole module name.*'\.\*query\.\*'"):
        loldu.inject(base(), LoLDUConfig(r=2, target_modules="query"))
    with pytest.raises(AdapterError, match="must match a whole module name"):
        loldu.inject(base(), LoLDUConfig(r=2, target_modules="nothing_like_it"))


def _saved_adapter(tmp_path):
    model = loldu.inject(base(), LoLDUConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    loldu.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_inspect_accepts_the_adapter_file_and_a_closed_pipe(tmp_path, capsys):
    import subprocess
    import sys

    from loldu.cli import main

    d = _saved_adapter(tmp_path)
    assert main(["inspect", str(d / WEIGHTS_NAME)]) == 0
    assert "bert.encoder.layer.0.attention.self.query" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothing.safetensors")]) == 1
    assert "no such adapter directory" in capsys.readouterr().err
    # `| head -c 10` closes the pipe after 10 bytes: no traceback, no "Exception ignored".
    cmd = f"{sys.executable} -m loldu inspect --json {d} | head -c 10"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert res.stdout == '{\n "direct' and "Traceback" not in res.stderr and "Exception" not in res.stderr, res.stderr


def test_export_refuses_a_base_of_another_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2Model

    from loldu.cli import main

    adapter = _saved_adapter(tmp_path)
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    rc = main(["export", "--base", str(tmp_path / "gpt2"), "--adapter", str(adapter), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "'gpt2' model (GPT2Model)" in err and "BertForSequenceClassification" in err, err
    assert not (tmp_path / "m.onnx").exists()
