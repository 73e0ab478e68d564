"""Factorization time of a 7B Llama layout (32 layers x (4 x 4096^2 + 3 x 4096 x 11008)), layer by layer:
bf16 weights, one layer resident at a time, at r = 16 and at full rank (docs/distributed.md).

Times loldu.distributed.factor_panel (what every rank computes after gathering the panel and the pivot
rows) and loldu.ldu on the whole weight (one process). Full rank is slow on a small CPU: --full-layers
times that many layers of each shape and the total is extrapolated (printed as such).

    python benchmarks/bench_factorize_7b.py [--full-layers 1] [--device cpu|cuda]
"""
import argparse
import time

import torch

from loldu.distributed import factor_panel
from loldu.ops import ldu

SHAPES = {"attn (4096, 4096)": ((4096, 4096), 4), "gate/up (11008, 4096)": ((11008, 4096), 2),
          "down (4096, 11008)": ((4096, 11008), 1)}
LAYERS = 32


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def one(shape, r, device, whole: bool, reps: int = 1) -> float:
    """The fastest of `reps` factorizations of one fresh random bf16 weight (the machine is shared)."""
    W = (torch.randn(shape, device=device) / shape[1] ** 0.5).to(torch.bfloat16)
    if whole:
        return min(timed(lambda: ldu(W, r), device) for _ in range(reps))
    cols = W[:, :r].contiguous()
    return min(timed(lambda: factor_panel(cols, lambda piv: W.index_select(0, piv), r, "partial"), device)
               for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-layers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-full", action="store_true")
    a = ap.parse_args()
    print(f"device {a.device}, torch threads {torch.get_num_threads()}, bf16 weights")
    for label, (shape, per_block) in SHAPES.items():
        for whole in (False, True):
            t = one(shape, 16, a.device, whole, reps=a.reps)
            print(f"r=16 {label} {'ldu(W)' if whole else 'panel+rows'}: {t * 1e3:.1f} ms/layer, "
                  f"x{per_block * LAYERS} = {t * per_block * LAYERS:.2f} s")
    if a.skip_full:
        return
    total = 0.0
    for label, (shape, per_block) in SHAPES.items():
        m = min(shape)
        ts = [one(shape, m, a.device, False) for _ in range(a.full_layers)]
        t = sum(ts) / len(ts)
        total += t * per_block * LAYERS
        print(f"full rank r={m} {label}: {t:.1f} s/layer (mean of {len(ts)}), x{per_block * LAYERS} = "
              f"{t * per_block * LAYERS / 60:.1f} min (extrapolated)")
    print(f"full rank, 7B layout, all {7 * LAYERS} layers: {total / 60:.1f} min (extrapolated)")


if __name__ == "__main__":
    main()
