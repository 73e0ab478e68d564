"""Truncated LDU: ours against LAPACK, side by side.

Three tables, medians in ms from one run:

1. vs torch.linalg.lu (`lapack_rows`): at full rank (r = min(d, k), what the paper's code does at
   rank 768) and at r in {16, 64, 128, 256}, ours against torch.linalg.lu on the same matrix (P, L,
   U: the factorization the leading components are read from), both timed alternately in the
   same loop so that the machine's load hits both alike; `ratio` = ours / torch.linalg.lu. A batch
   (B, d, k) of same-shape layers is compared with one torch.linalg.lu call per matrix: the
   batched call on the CPU runs getrf from several OpenMP threads at once, which in torch 2.13 +
   MKL on a 2-core machine printed MKL errors and returned wrong pivots.
2. full rank (`full_rank_rows`): loldu.ops.ldu(W, min(d, k)) and loldu.ops.lu_packed(W) against
   torch.linalg.lu_factor (one getrf: what full-rank ldu must cost), at torch's default thread count
   and at 1 thread, the three interleaved; with the packed-LU layer's step (forward + input gradient
   of loldu.ops.lu_linear at 768 x 768, n = 2048) against the frozen base layer's (x W0^T forward,
   g W0 backward) at 2 and 1 threads (`lu_step_rows`). Medians, min and max over the repetitions.
3. large weights at small r (`rows`): ours, the paper's approach (full torch.linalg.lu, then slice,
   timed once per shape since it does not depend on r), the plain-PyTorch sketch of the same
   panel algorithm (loldu.reference), and the read floor: the measured time to gather the
   (d + k) r elements the method must read (W[:, :r] and the r pivot rows).

--threads N sets torch's threads; --clock cpu times process CPU time instead of wall time: with
--threads 1 it is robust to other jobs sharing the cores (the JSON name then says so).

    python benchmarks/bench_ldu.py [--quick] [--device cuda] [--only lapack|full|truncated] [--threads 1 --clock cpu]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

import loldu  # noqa: E402
from loldu.reference import ldu_reference  # noqa: E402

# Table 1: BERT-base-like layers (768, 768/3072), a smaller and a larger square, one batch of
# same-shape layers; fp64 for one shape.
LAPACK_CASES = [((384, 384), torch.float32), ((384, 1536), torch.float32), ((1536, 384), torch.float32),
                ((768, 768), torch.float32), ((768, 3072), torch.float32), ((3072, 768), torch.float32),
                ((1024, 1024), torch.float32), ((12, 768, 768), torch.float32), ((768, 768), torch.float64)]
LAPACK_RANKS = [16, 64, 128, 256]
# Table 2
SHAPES = [(768, 768), (1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = [1, 8, 16, 64, 256]


def full_lu_then_slice(W, r):
    P, L, U = torch.linalg.lu(W)
    D = U.diagonal()[:r]
    return (P @ L)[:, :r], D, U[:r] / D[:, None]


def lapack_lu(W):
    """torch.linalg.lu on W, one call per matrix for a batch (see the module docstring)."""
    return torch.linalg.lu(W) if W.dim() == 2 else [torch.linalg.lu(w) for w in W]


def _timed(fns, reps, clock, warmup, sync):
    """Seconds of each function per repetition, the functions called in turn inside each repetition."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for f, t in zip(fns, times):
            if sync:
                sync()
            t0 = clock()
            f()
            if sync:
                sync()
            t.append(clock() - t0)
    return times


def interleaved(fns, reps, clock, warmup=2, sync=None):
    """Median and min seconds of each function, the functions called in turn inside each repetition."""
    return [(statistics.median(t), min(t)) for t in _timed(fns, reps, clock, warmup, sync)]


def lapack_table(cases, dev, sync, clock):
    rows = []
    for shape, dtype in cases:
        W = torch.randn(*shape, device=dev, dtype=dtype)
        m = min(shape[-2:])
        flops = (shape[0] if len(shape) == 3 else 1) * shape[-2] * shape[-1] * m
        reps = 9 if flops > 2e9 else (15 if flops > 2e8 else 31)
        for r in [m] + [r for r in LAPACK_RANKS if r < m]:
            (ours, ours_min), (lu, lu_min) = interleaved([lambda: loldu.ops.ldu(W, r), lambda: lapack_lu(W)],
                                                         reps, clock, sync=sync)
            rows.append({"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                         "r": "full" if r == m else r, "ours_ms": ours * 1e3, "lapack_lu_ms": lu * 1e3,
                         "ratio": ours / lu, "ours_min_ms": ours_min * 1e3, "lapack_lu_min_ms": lu_min * 1e3})
            print(f"  {tuple(shape)} {dtype} r={r}: ours {ours * 1e3:.3f} ms, torch.linalg.lu {lu * 1e3:.3f} ms, "
                  f"ratio {ours / lu:.2f}", flush=True)
    return rows


def spread(fns, reps, clock, sync=None):
    """(median, min, max) ms of each function, called in turn inside each repetition."""
    ms = [[v * 1e3 for v in t] for t in _timed(fns, reps, clock, 1, sync)]
    return [(statistics.median(t), min(t), max(t)) for t in ms]


def _thread_counts(*wanted):
    return list(dict.fromkeys(torch.get_num_threads() if n == 0 else n for n in wanted))


FULL_SHAPES = [(768, 768), (768, 3072), (3072, 768), (1024, 1024)]


def full_rank_table(shapes, dev, sync, clock, reps):
    rows = []
    default = torch.get_num_threads()
    for threads in _thread_counts(0, 1):
        torch.set_num_threads(threads)
        for d, k in shapes:
            W, m = torch.randn(d, k, device=dev), min(d, k)
            ours, packed, lu = spread([lambda: loldu.ops.ldu(W, m), lambda: loldu.ops.lu_packed(W),
                                       lambda: torch.linalg.lu_factor(W)], reps, clock, sync)
            rows.append({"shape": f"{d}x{k}", "threads": threads, "ldu_ms": ours[0], "lu_packed_ms": packed[0],
                         "lu_factor_ms": lu[0], "ldu_ratio": ours[0] / lu[0], "packed_ratio": packed[0] / lu[0],
                         "ldu_min_max": f"{ours[1]:.2f}-{ours[2]:.2f}", "lu_factor_min_max": f"{lu[1]:.2f}-{lu[2]:.2f}"})
            print(f"  ({d}, {k}) threads={threads}: ldu {ours[0]:.2f} ms, lu_packed {packed[0]:.2f} ms, "
                  f"lu_factor {lu[0]:.2f} ms, ratios {ours[0] / lu[0]:.2f} / {packed[0] / lu[0]:.2f}", flush=True)
    torch.set_num_threads(default)
    return rows


def lu_step_table(dev, sync, clock, reps, d=768, k=768, n=2048):
    """One training step's work on x of the packed-LU layer against the frozen base layer's."""
    rows = []
    default = torch.get_num_threads()
    W = torch.randn(d, k, device=dev)
    LU, perm, D = loldu.ops.lu_packed(W)
    c = 0.01 * torch.randn(min(d, k), device=dev)
    x = torch.randn(n, k, device=dev, requires_grad=True)
    g = torch.randn(n, d, device=dev)

    def ours():
        loldu.ops.lu_linear(x, LU, perm, D, c).backward(g)

    def base():
        torch.nn.functional.linear(x, W).backward(g)

    for threads in _thread_counts(2, 1):
        torch.set_num_threads(threads)
        (o, o_min, o_max), (b, b_min, b_max) = spread([ours, base], reps, clock, sync)
        rows.append({"shape": f"{d}x{k}", "n": n, "threads": threads, "lu_op_ms": o, "base_ms": b, "ratio": o / b,
                     "lu_op_min_max": f"{o_min:.2f}-{o_max:.2f}", "base_min_max": f"{b_min:.2f}-{b_max:.2f}"})
        print(f"  lu_linear step ({d}, {k}) n={n} threads={threads}: {o:.2f} ms, base {b:.2f} ms, ratio {o / b:.2f}",
              flush=True)
    torch.set_num_threads(default)
    return rows


def median_time(fn, reps, clock, warmup=1, sync=None):
    return interleaved([fn], reps, clock, warmup=warmup, sync=sync)[0][0]


def truncated_table(shapes, dev, sync, clock):
    rows = []
    for d, k in shapes:
        W = torch.randn(d, k, device=dev)
        full = median_time(lambda: full_lu_then_slice(W, 16), 3 if d * k > 4e6 else 5, clock, sync=sync)
        for r in RANKS:
            piv = loldu.ops.ldu(W, r).pivots
            ours = median_time(lambda: loldu.ops.ldu(W, r), 30, clock, warmup=3, sync=sync)
            floor = median_time(lambda: (W[:, :r].clone(), W[piv].clone()), 30, clock, warmup=3, sync=sync)
            sketch = median_time(lambda: ldu_reference(W, r), 3, clock, sync=sync) if r <= 64 else None
            rows.append({
                "d": d, "k": k, "r": r,
                "ours_ms": ours * 1e3, "full_lu_ms": full * 1e3,
                "speedup_vs_full_lu": full / ours,
                "pytorch_sketch_ms": None if sketch is None else sketch * 1e3,
                "read_floor_ms": floor * 1e3, "ours_over_floor": ours / floor,
            })
            print(f"  ({d}, {k}) r={r}: ours {ours * 1e3:.3f} ms, full LU {full * 1e3:.1f} ms, x{full / ours:,.0f}",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few small shapes only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["lapack", "full", "truncated"], help="run one of the three tables")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall time, or process CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    payload = {"machine": machine(), "build": loldu.build_info(), "threads": torch.get_num_threads(),
               "clock": args.clock}
    if args.only in (None, "lapack"):
        cases = LAPACK_CASES[:2] if args.quick else LAPACK_CASES
        rows = lapack_table(cases, dev, sync, clock)
        cols = ["shape", "dtype", "r", "ours_ms", "lapack_lu_ms", "ratio", "ours_min_ms", "lapack_lu_min_ms"]
        payload.update(lapack_rows=rows, lapack_table=print_table(rows, cols))
    if args.only in (None, "full"):
        rows = full_rank_table(FULL_SHAPES[:1] if args.quick else FULL_SHAPES, dev, sync, clock, 9 if args.quick else 21)
        cols = ["shape", "threads", "ldu_ms", "lu_packed_ms", "lu_factor_ms", "ldu_ratio", "packed_ratio", "ldu_min_max",
                "lu_factor_min_max"]
        payload.update(full_rank_rows=rows, full_rank_table=print_table(rows, cols))
        rows = lu_step_table(dev, sync, clock, 5 if args.quick else 15)
        cols = ["shape", "n", "threads", "lu_op_ms", "base_ms", "ratio", "lu_op_min_max", "base_min_max"]
        payload.update(lu_step_rows=rows, lu_step_table=print_table(rows, cols))
    if args.only in (None, "truncated"):
        rows = truncated_table(SHAPES[:2] if args.quick else SHAPES, dev, sync, clock)
        cols = ["d", "k", "r", "ours_ms", "full_lu_ms", "speedup_vs_full_lu", "pytorch_sketch_ms", "read_floor_ms",
                "ours_over_floor"]
        payload.update(rows=rows, table=print_table(rows, cols))
    suffix = ((f"_{args.only}" if args.only else "") + (f"_threads{args.threads}" if args.threads else "")
              + ("_cpuclock" if args.clock == "cpu" else ""))
    write_json(f"bench_ldu_{dev.type}{suffix}", payload)


if __name__ == "__main__":
    main()
