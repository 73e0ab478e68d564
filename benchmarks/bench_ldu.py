"""Truncated LDU: ours against the paper's approach (full torch.linalg.lu, then slice), side by side.

Columns: median milliseconds of ours, of the full LU (timed once per shape: it does not depend
on r), of the plain-PyTorch sketch of the same panel algorithm (loldu.reference), and the read
floor: the measured time to gather the (d + k) r elements the method must read (W[:, :r] and the
r pivot rows). Ratios are computed from medians of the same run.

    python benchmarks/bench_ldu.py [--quick] [--device cuda]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, print_table, write_json  # noqa: E402

import loldu  # noqa: E402
from loldu.reference import ldu_reference  # noqa: E402

SHAPES = [(768, 768), (1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = [1, 8, 16, 64, 256]


def full_lu_then_slice(W, r):
    P, L, U = torch.linalg.lu(W)
    D = U.diagonal()[:r]
    return (P @ L)[:, :r], D, U[:r] / D[:, None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two small shapes only")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for d, k in shapes:
        W = torch.randn(d, k, device=dev)
        full = median_time(lambda: full_lu_then_slice(W, 16), reps=3 if d * k > 4e6 else 5, sync=sync)
        for r in RANKS:
            piv = loldu.ops.ldu(W, r).pivots
            ours = median_time(lambda: loldu.ops.ldu(W, r), reps=30, warmup=3, sync=sync)
            floor = median_time(lambda: (W[:, :r].clone(), W[piv].clone()), reps=30, warmup=3, sync=sync)
            sketch = median_time(lambda: ldu_reference(W, r), reps=3, sync=sync) if r <= 64 else None
            rows.append({
                "d": d, "k": k, "r": r,
                "ours_ms": ours * 1e3, "full_lu_ms": full * 1e3,
                "speedup_vs_full_lu": full / ours,
                "pytorch_sketch_ms": None if sketch is None else sketch * 1e3,
                "read_floor_ms": floor * 1e3, "ours_over_floor": ours / floor,
            })
            print(f"  ({d}, {k}) r={r}: ours {ours * 1e3:.3f} ms, full LU {full * 1e3:.1f} ms, x{full / ours:,.0f}",
                  flush=True)
    cols = ["d", "k", "r", "ours_ms", "full_lu_ms", "speedup_vs_full_lu", "pytorch_sketch_ms", "read_floor_ms",
            "ours_over_floor"]
    table = print_table(rows, cols)
    write_json(f"bench_ldu_{dev.type}", {"machine": machine(), "build": loldu.build_info(), "rows": rows,
                                        "table": table})


if __name__ == "__main__":
    main()
