"""The transformers Trainer with LoLDU adapters (loldu.trainer): checkpoints hold the adapter only,
resume exactly, load for inference with loldu.load_adapter, and carry task heads (SEQ_CLS).

Tiny models built from config (2 layers, hidden 32) on the CPU, a few optimizer steps each.
"""
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import loldu
from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from loldu.trainer import LoLDUTrainer, restore_adapter

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- tiny models and data -------------------------------------------------------------------------
def llama_config():
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)


def bert_config():
    # Dropout left at BERT's 0.1: resuming must restore the RNG state too.
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, num_labels=3)


def causal_task(n=12, seq=10):
    """(make, data): make() builds the same injected Llama each call (fresh random base per test)."""
    cfg = llama_config()
    base = LlamaForCausalLM(cfg).state_dict()
    config = loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], train_scale=True)

    def make(inject=True):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base)
        return loldu.inject(m, config) if inject else m

    ids = torch.randint(0, cfg.vocab_size, (n, seq))
    return make, [{"input_ids": r, "labels": r} for r in ids]


def seq_cls_task(base_dir: Path, n=12, seq=10):
    """(make, data) for sequence classification: a pretrained encoder (a BertModel saved to base_dir)
    under AutoModelForSequenceClassification, whose `classifier` is fresh (random) at every load and
    is trained and saved with the adapter (task_type="SEQ_CLS")."""
    cfg = bert_config()
    BertModel(cfg, add_pooling_layer=True).save_pretrained(base_dir)
    config = loldu.LoLDUConfig(rank=4, target_modules=["query", "value"], task_type="SEQ_CLS", train_scale=True)
    head_init = int(torch.randint(0, 2**31 - 1, ()))

    def make(inject=True, head_seed=None):
        torch.manual_seed(head_init if head_seed is None else head_seed)  # the fresh classifier's init
        m = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=cfg.num_labels)
        return loldu.inject(m, config) if inject else m

    ids = torch.randint(0, cfg.vocab_size, (n, seq))
    labels = torch.randint(0, cfg.num_labels, (n,))
    return make, [{"input_ids": r, "labels": y} for r, y in zip(ids, labels)]


def targs(out, **kw):
    kw = {"per_device_train_batch_size": 4, "learning_rate": 2e-2, "report_to": [], "use_cpu": True,
          "disable_tqdm": True, "logging_strategy": "no", "seed": int(torch.randint(0, 2**31 - 1, ())), **kw}
    return TrainingArguments(str(out), **kw)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def values(model):
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def checkpoints(out) -> list:
    return sorted(os.listdir(out), key=lambda n: int(re.sub(r"\D", "", n) or 0))


class Logged(torch.utils.data.Dataset):
    """A list of examples that records the index of every example fetched, in order."""

    def __init__(self, examples):
        self.examples, self.seen = examples, []

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.examples[i]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


class AtTrainBegin(TrainerCallback):
    """Records the trainable values and the optimizer state when training (or resuming) begins."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.values = values(model)
        self.optimizer = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}


def eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits.double()


def assert_close_outputs(got, want, what):
    # The same z, sigma and heads (copies of the stored fp32 values) on the same base weights; the factors
    # come from the stored pivots (loldu.ldu_from_pivots) where training used loldu.ldu's, and a form='dense'
    # adapter builds W0 + PL diag(c) U where the trained one may add the rank-r branch: another GEMM route,
    # so a bound and not bit equality. 1e-5 of the output scale is ~100 fp32 ulps (seen: <= 3e-7 relative).
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{what}: max |difference| {err}"
    return err


def movement(model, init):
    """max |trained - initial| over the trainable values."""
    return max((p.detach() - init[n]).abs().max().item() for n, p in trainable(model).items())


# -- checkpoints are the adapter ------------------------------------------------------------------
def test_checkpoints_hold_the_adapter_and_load_for_inference(tmp_path):
    make, data = causal_task()
    model = make()
    init = values(model)
    base_bytes = sum(p.numel() * p.element_size() for p in make(inject=False).parameters())
    trainer = LoLDUTrainer(model=model, args=targs(tmp_path / "out", max_steps=4, save_steps=2), train_dataset=data)
    trainer.train()
    trainer.save_model()
    assert movement(model, init) > 1e-3  # trained: the adapter is not at its c = 0 start
    out = tmp_path / "out"
    assert checkpoints(out)[-2:] == ["checkpoint-2", "checkpoint-4"]
    for d in (out / "checkpoint-2", out / "checkpoint-4", out):
        files = set(os.listdir(d))
        assert {WEIGHTS_NAME, CONFIG_NAME} <= files, (d, files)
        assert not {f for f in files if f.endswith((".safetensors", ".bin", ".pt")) and f not in
                    {WEIGHTS_NAME, "training_args.bin", "optimizer.pt", "scheduler.pt"}}, files
        assert "config.json" not in files and "model.safetensors" not in files
        _, _, tensors = read_adapter(d)
        assert set(tensors) == {"z", "sigma", "pivots", "fingerprint"}  # no base weight inside
        assert (d / WEIGHTS_NAME).stat().st_size < base_bytes / 20
    for d in (out / "checkpoint-2", out / "checkpoint-4"):
        assert TRAINER_FILES <= set(os.listdir(d))
    # The final directory and the last checkpoint hold the same (final) adapter.
    assert torch.equal(read_adapter(out)[2]["z"], read_adapter(out / "checkpoint-4")[2]["z"])

    batch = torch.randint(0, 64, (3, 10))
    want = eval_logits(model, batch)
    base_out = eval_logits(make(inject=False), batch)
    fresh = loldu.load_adapter(make(inject=False), out / "checkpoint-4")
    assert not trainable(fresh)  # loaded for inference (is_trainable=False)
    err = assert_close_outputs(eval_logits(fresh, batch), want, "checkpoint-4 loaded into a fresh base")
    assert (base_out - want).abs().max().item() > 100 * max(err, 1e-7)  # the adapter changed the outputs
    # restore_adapter (what resuming runs) into an adapter that computes in another form: same outputs.
    dense = make(inject=False)
    loldu.inject(dense, loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], train_scale=True,
                                          form="dense"))
    restore_adapter(dense, out / "checkpoint-4")
    assert_close_outputs(eval_logits(dense, batch), want, "checkpoint-4 restored into a form='dense' adapter")
    # An earlier checkpoint is another adapter: the one of step 2.
    early = eval_logits(loldu.load_adapter(make(inject=False), out / "checkpoint-2"), batch)
    assert (early - want).abs().max().item() > 100 * max(err, 1e-7)


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["causal", "seq_cls"])
def test_resume_equals_straight_training(tmp_path, task):
    """N steps straight == k steps, stop, a fresh model and Trainer resuming to N: same data order,
    same z/sigma/head values and optimizer state."""
    make, data = causal_task() if task == "causal" else seq_cls_task(tmp_path / "base")
    N, k = 6, 4  # 3 steps per epoch: the stop falls inside the second epoch
    seed = int(torch.randint(0, 2**31 - 1, ()))
    straight = make()
    init = values(straight)
    data_a, data_b, data_c = Logged(data), Logged(data), Logged(data)
    ta = LoLDUTrainer(model=straight, args=targs(tmp_path / "a", max_steps=N, save_steps=N, seed=seed),
                      train_dataset=data_a)
    ta.train()

    stopped = make()
    tb = LoLDUTrainer(model=stopped, args=targs(tmp_path / "b", max_steps=N, save_steps=k, seed=seed),
                      train_dataset=data_b, callbacks=[StopAt(k)])
    tb.train()
    assert checkpoints(tmp_path / "b") == [f"checkpoint-{k}"]
    at_k = values(stopped)
    opt_k = tb.optimizer.state_dict()["state"]

    resumed = make()
    before = trainable(resumed)
    begin = AtTrainBegin()
    tc = LoLDUTrainer(model=resumed, args=targs(tmp_path / "b", max_steps=N, save_steps=N, seed=seed),
                      train_dataset=data_c, callbacks=[begin])
    tc.train(resume_from_checkpoint=True)
    assert tc.state.global_step == N
    # Same data order: steps 1..k of the stopped run and k+1..N of the resumed one are the straight run's
    # batches (each run may fetch one batch ahead of its last step: prefixes are compared).
    b = 4  # per_device_train_batch_size
    assert len(data_a.seen) >= N * b and data_b.seen[: k * b] == data_a.seen[: k * b]
    assert data_c.seen[: (N - k) * b] == data_a.seen[k * b : N * b]
    # Restored in place: the same parameter objects, still the trainable ones, holding step k's values
    # (a copy of the stored fp32 values) and step k's optimizer state.
    after = trainable(resumed)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in after)
    if task == "seq_cls":
        assert any("classifier" in n for n in after)  # the head trains and is restored too
    assert begin.values.keys() == at_k.keys()
    for n in at_k:
        assert torch.equal(begin.values[n], at_k[n]), n
    assert begin.optimizer.keys() == opt_k.keys()
    for i in opt_k:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(begin.optimizer[i][key], opt_k[i][key]), (i, key)

    # Same computations on the same batches in the same order: equal up to a bound (not bit for bit:
    # the BLAS may split a reduction differently between runs), far below what one step moves.
    moved = movement(straight, init)
    final_a, final_c = values(straight), values(resumed)
    worst = max((final_a[n] - final_c[n]).abs().max().item() for n in final_a)
    assert worst <= 1e-5 * moved, (worst, moved)
    assert max((final_a[n] - at_k[n]).abs().max().item() for n in final_a) > 0.05 * moved  # steps k..N did something
    sa, sc = ta.optimizer.state_dict()["state"], tc.optimizer.state_dict()["state"]
    for i in sa:
        torch.testing.assert_close(sc[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-4, atol=1e-5 * sa[i]["exp_avg"].abs().max())


def test_seq_cls_checkpoint_reproduces_logits_in_fresh_model(tmp_path):
    make, data = seq_cls_task(tmp_path / "base")
    model = make()
    heads = [n for n in trainable(model) if "classifier" in n]
    assert heads  # task_type="SEQ_CLS" trains the classifier fully
    trainer = LoLDUTrainer(model=model, args=targs(tmp_path / "out", max_steps=4, save_steps=4), train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-4"
    _, config, tensors = read_adapter(ckpt)
    assert config.task_type == "SEQ_CLS" and any(k.endswith("classifier.weight") for k in tensors)

    batch = torch.randint(0, 64, (5, 10))
    want = eval_logits(model, batch)
    # A fresh load of the pretrained encoder: its classifier is a new random one.
    fresh = make(inject=False, head_seed=int(torch.randint(0, 2**31 - 1, ())))
    before = eval_logits(fresh, batch)
    loldu.load_adapter(fresh, ckpt)
    err = assert_close_outputs(eval_logits(fresh, batch), want, "SEQ_CLS checkpoint in a fresh model")
    assert (before - want).abs().max().item() > 100 * max(err, 1e-7)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    make, data = causal_task()
    model = make()
    scripted = iter([3.0, 1.0, 2.0])  # the second evaluation (step 4) is the best, not the last

    def compute_metrics(_):
        return {"scripted": next(scripted)}

    args = targs(tmp_path / "out", max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="scripted", greater_is_better=False)
    trainer = LoLDUTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                           compute_metrics=compute_metrics)
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-4")
    best, last = read_adapter(out / "checkpoint-4")[2], read_adapter(out / "checkpoint-6")[2]
    assert not torch.equal(best["z"], last["z"])
    layers = loldu.adapted_layers(model)
    assert torch.equal(torch.cat([layer.loldu_z["default"].detach() for _, layer in layers]), best["z"])
    assert torch.equal(torch.stack([layer.loldu_sigma["default"].detach() for _, layer in layers]), best["sigma"])
    assert trainable(model)  # still trainable after the restore


@pytest.mark.parametrize("kw", [{"bf16": True}, {"activation_checkpointing": True}], ids=["bf16", "checkpointing"])
def test_bf16_and_activation_checkpointing_train_every_layer_and_load(tmp_path, kw):
    make, data = causal_task(n=8)
    model = make()
    init = values(model)
    trainer = LoLDUTrainer(model=model, args=targs(tmp_path / "out", max_steps=2, save_steps=2, **kw), train_dataset=data)
    trainer.train()
    for n, p in trainable(model).items():  # every z got a gradient (Adam moves each entry by ~lr per step)
        if "loldu_z" in n:
            assert (p.detach() - init[n]).abs().max().item() > 1e-3, n
    # With bf16, accelerate leaves the trained model's forward wrapped in bf16 autocast: compare in fp32.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    batch = torch.randint(0, 64, (3, 10))
    fresh = loldu.load_adapter(make(inject=False), tmp_path / "out" / "checkpoint-2")
    assert_close_outputs(eval_logits(fresh, batch), eval_logits(model, batch), f"{kw} checkpoint")


def test_loldu_model_handle_trains_evaluates_and_resumes(tmp_path):
    """A loldu.get_loldu_model handle (PEFT's surface): Trainer sees the wrapped model's inputs and labels."""
    make, data = causal_task(n=8)
    config = loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj"])
    model = loldu.get_loldu_model(make(inject=False), config)
    init = values(model)
    trainer = LoLDUTrainer(model=model, args=targs(tmp_path / "out", max_steps=2, save_steps=2), train_dataset=data,
                           eval_dataset=data[:4])
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert movement(model, init) > 1e-3
    assert "eval_loss" in trainer.evaluate()
    assert {WEIGHTS_NAME, CONFIG_NAME} | TRAINER_FILES <= set(os.listdir(tmp_path / "out" / "checkpoint-2"))
    resumed = loldu.get_loldu_model(make(inject=False), config)
    begin = AtTrainBegin()
    again = LoLDUTrainer(model=resumed, args=targs(tmp_path / "out", max_steps=4, save_steps=2), train_dataset=data,
                         callbacks=[begin])
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 4
    at_2 = values(model)
    assert begin.values.keys() == at_2.keys() and all(torch.equal(begin.values[n], at_2[n]) for n in at_2)


def test_resumes_a_checkpoint_of_the_plain_trainer(tmp_path, monkeypatch):
    """A checkpoint the plain Trainer wrote (the whole injected model) is loaded by Trainer's own code.
    loldu refuses the plain Trainer now; such checkpoints come from earlier versions, made here with
    the refusal switched off."""
    make, data = causal_task(n=8)
    model = make()
    with monkeypatch.context() as m:
        m.setattr(loldu.wrapper, "_refuse_plain_trainer", lambda *args, **kwargs: None)
        Trainer(model=model, args=targs(tmp_path / "out", max_steps=2, save_steps=2), train_dataset=data).train()
    assert "model.safetensors" in os.listdir(tmp_path / "out" / "checkpoint-2")
    begin = AtTrainBegin()
    resumed = make()
    trainer = LoLDUTrainer(model=resumed, args=targs(tmp_path / "out", max_steps=3, save_steps=3), train_dataset=data,
                           callbacks=[begin])
    trainer.train(resume_from_checkpoint=True)
    at_2 = values(model)
    assert begin.values.keys() == at_2.keys() and all(torch.equal(begin.values[n], at_2[n]) for n in at_2)
    assert WEIGHTS_NAME in os.listdir(tmp_path / "out" / "checkpoint-3")


# -- refusals -------------------------------------------------------------------------------------
def test_refuses_a_model_without_adapter_and_a_frozen_adapter(tmp_path):
    make, data = causal_task(n=4)
    plain = make(inject=False)
    with pytest.raises(loldu.AdapterError, match="no LoLDU layers"):
        LoLDUTrainer(model=plain, args=targs(tmp_path / "p", max_steps=1), train_dataset=data)
    assert loldu.adapted_layers(plain) == []
    trained = make()
    LoLDUTrainer(model=trained, args=targs(tmp_path / "a", max_steps=1, save_steps=1), train_dataset=data).train()
    frozen = loldu.load_adapter(make(inject=False), tmp_path / "a" / "checkpoint-1")  # is_trainable=False
    trainer = LoLDUTrainer(model=frozen, args=targs(tmp_path / "f", max_steps=1), train_dataset=data)
    with pytest.raises(loldu.AdapterError, match="nothing to train.*is_trainable=True"):
        trainer.train()
    again = loldu.load_adapter(make(inject=False), tmp_path / "a" / "checkpoint-1", is_trainable=True)
    assert trainable(again)


def test_resume_refuses_another_base_or_config_and_changes_nothing(tmp_path):
    make, data = causal_task(n=4)
    LoLDUTrainer(model=make(), args=targs(tmp_path / "a", max_steps=1, save_steps=1), train_dataset=data).train()
    ckpt = tmp_path / "a" / "checkpoint-1"

    other_base = loldu.inject(LlamaForCausalLM(llama_config()),
                              loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], train_scale=True))
    other_alpha = make(inject=False)
    loldu.inject(other_alpha, loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], train_scale=True,
                                                alpha=3.0))
    other_storage = make(inject=False)
    loldu.inject(other_storage, loldu.LoLDUConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  train_scale=True, factor_storage="cur"))
    for model, match in ((other_base, "fingerprint"), (other_alpha, r"alpha \(1\.0 saved, 3\.0 in the model\)"),
                         (other_storage, r"factor_storage \('full' saved, 'cur' in the model\)")):
        loldu.add_adapter(model, "second")  # a second adapter: names and activity must survive too
        before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        names, active = loldu.adapter_names(model), loldu.active_adapter(model)
        trainer = LoLDUTrainer(model=model, args=targs(tmp_path / "a", max_steps=2), train_dataset=data)
        with pytest.raises(loldu.AdapterError, match=match) as info:
            trainer.train(resume_from_checkpoint=str(ckpt))
        assert str(ckpt) in str(info.value)
        with pytest.raises(loldu.AdapterError, match=match):
            restore_adapter(model, ckpt)
        after = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters()}
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)
        assert loldu.adapter_names(model) == names and loldu.active_adapter(model) == active


# -- docs/trainer.md ------------------------------------------------------------------------------
def test_trainer_doc_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/trainer.md holds no ```python example"
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "trainer_doc_example"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}[{i}]", "exec"), scope)
    out = capsys.readouterr().out
    m = re.search(r"max \|logits difference\|: ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) <= 1e-5, out
    assert (tmp_path / "out" / "checkpoint-4" / WEIGHTS_NAME).is_file()
