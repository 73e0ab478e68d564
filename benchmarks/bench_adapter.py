"""One training step of an adapted linear layer, side by side in one run:

  base       the frozen nn.Linear alone: forward + input gradient (the floor)
  auto       loldu.inject on that Linear: the fused op with form="auto" (forward, backward, AdamW over z)
  delta      the same layer with the delta form forced (loldu.ops.forced_form)
  dense      the same layer with the dense form forced (docs/method.md §7)
  cur        loldu.inject with factor_storage="cur": only L11, U11 (r x r) kept, the branch read from
             W0's pivot rows (the base output) and leading columns with two triangular solves (§8)
  lu         loldu.inject with factor_storage="lu" (full rank only; no column below it): the packed LU
             in place of W0, the layer two triangular products each way (loldu.ops.lu_linear)
  lora       PEFT's LoRA at the same rank (benchmark-only dependency: pip install peft)
  ia3        PEFT's IA3 on the same Linear (a learned scale per output feature, d numbers)
  reference  the paper's released approach: a torch.nn.utils.parametrize parametrization that
             forms the dense update P @ L_r diag(z) U_r through a (d, d) permutation matrix every
             forward

The methods run round-robin within each repetition (in an order rotated from one repetition to
the next), so machine noise and cache effects hit them alike; the
table gives per-method medians and ratios to the base step, which form "auto" ran, and how far
auto is from the faster of the two forced forms. --clock cpu times process CPU time instead of
wall time: with --threads 1 it is robust to other jobs sharing the cores.

By default a representative subset of the grid runs (SUBSET: every shape and rank at n = 2048, and
the ends n = 512, 8192 at 768 x 768 and 1024 x 1024); --full runs the whole grid, shapes x ranks x
tokens (4096 x 4096 at n = 8192 skipped unless named in --points).

    python benchmarks/bench_adapter.py [--full | --quick] [--device cuda] [--dtype bf16] [--threads 1 --clock cpu]
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

import loldu  # noqa: E402

FORMS = ("auto", "delta", "dense")  # one loldu model, three settings of the form hook
SHAPES = "384x384,384x1536,768x768,768x3072,1024x1024,4096x4096"
QUICK = {"shapes": "384x384,768x768,1024x1024", "tokens": "512,2048", "ranks": "16,64,full"}
SUBSET = ",".join([f"{s}:{r}:2048" for s in SHAPES.split(",") for r in ("16", "64", "full")]
                  + [f"{s}:{r}:{n}" for s in ("768x768", "1024x1024") for r in ("16", "64", "full")
                     for n in ("512", "8192")])
METHODS = "base,loldu,cur,lu,lora,ia3,reference"


class DenseLoLDU(nn.Module):
    """The reference parametrization: W = W0 - σ0 P L_r diag(D) U_r + σ P L_r diag(z) U_r, dense."""

    def __init__(self, W: torch.Tensor, r: int):
        super().__init__()
        P, L, U = torch.linalg.lu(W.float())
        D = U.diagonal()[:r]
        self.register_buffer("P", P.to(W.dtype))                  # (d, d) permutation matrix
        self.register_buffer("L", L[:, :r].to(W.dtype))
        self.register_buffer("U", (U[:r] / D[:, None]).to(W.dtype))
        self.register_buffer("D", D)
        self.z = nn.Parameter(D.clone())
        self.sigma0 = 1.0 / r

    def forward(self, W0):
        c = (self.sigma0 * (self.z - self.D)).to(W0.dtype)
        return W0 + (self.P @ (self.L * c)) @ self.U


def build(method: str, d: int, k: int, r: int, dtype, device):
    """(model, trainable parameters, optimizer), or None where the method does not apply ("lu" below full rank)."""
    if method == "lu" and r != min(d, k):
        return None
    lin = nn.Linear(k, d, bias=True).to(device=device, dtype=dtype)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    model = nn.Sequential(lin)
    if method in ("loldu", "cur", "lu"):
        storage = "full" if method == "loldu" else method
        loldu.inject(model, loldu.LoLDUConfig(rank=r, target_modules=["0"], factor_storage=storage))
    elif method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
        for n, p in model.named_parameters():  # start away from B = 0 so every matmul does work
            if "lora_B" in n:
                nn.init.normal_(p, std=1e-3)
    elif method == "ia3":
        import peft

        model = peft.get_peft_model(model, peft.IA3Config(target_modules=["0"], feedforward_modules=[]))
    elif method == "reference":
        parametrize.register_parametrization(lin, "weight", DenseLoLDU(lin.weight.detach(), r))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, params, opt


def step_fn(model, opt, x, form=None):
    def step():
        # The form is chosen in the forward; the backward runs the one the forward ran.
        with loldu.ops.forced_form(form) if form is not None else contextlib.nullcontext():
            y = model(x)
        y.backward(torch.ones_like(y))  # a fixed upstream gradient; x.grad is produced too
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
    return step


def goals(rows) -> list:
    """The targets this benchmark reports against, with the measured values (None: point not run)."""
    def at(d, k, r, n, key):
        """The value of `key` at (d, k, r, n) (n None: the first row of (d, k, r))."""
        return next((row.get(key) for row in rows if (row["d"], row["k"], row["r"]) == (d, k, r)
                     and n in (None, row["n"])), None)

    out = []
    gaps = [row["auto_gap"] for row in rows if row.get("auto_gap") is not None]
    if gaps:
        out.append(("auto within 5% of the faster forced form at every point", max(gaps), 0.05))
    full_rank = sorted({(row["d"], row["k"]) for row in rows if row["r"] == min(row["d"], row["k"])})
    for d, k in full_rank:
        m = min(d, k)
        for n in sorted({row["n"] for row in rows if (row["d"], row["k"], row["r"]) == (d, k, m)}):
            out.append((f"lu/base at {d}x{k}, r={m}, n={n} <= 1.35", at(d, k, m, n, "lu/base"), 1.35))
            ref, lu = at(d, k, m, n, "reference_ms"), at(d, k, m, n, "lu_ms")
            out.append((f"lu/reference at {d}x{k}, r={m}, n={n} <= 1/1.7", None if ref is None or lu is None
                        else lu / ref, 1 / 1.7))
            out.append((f"auto/base (the default storage) at {d}x{k}, r={m}, n={n} <= 1.9",
                        at(d, k, m, n, "auto/base"), 1.9))
        bytes_lu, bytes_base = at(d, k, m, None, "lu_layer_bytes"), at(d, k, m, None, "base_layer_bytes")
        out.append((f"lu layer bytes / base layer bytes at {d}x{k} <= 1.05", None if bytes_lu is None else
                    bytes_lu / bytes_base, 1.05))
    for (d, k, r, n, key, bound) in [(768, 768, 768, 2048, "auto/base", 1.8), (768, 768, 768, 8192, "auto/base", 1.6),
                                     (4096, 4096, 16, 2048, "auto/base", 1.05),
                                     (1024, 1024, 16, 2048, "auto/base", 1.10), (1024, 1024, 64, 2048, "auto/base", 1.10),
                                     (1024, 1024, 16, 2048, "delta/base", 1.10),
                                     (1024, 1024, 64, 2048, "delta/base", 1.10)]:
        out.append((f"{key} at {d}x{k}, r={r}, n={n} <= {bound}", at(d, k, r, n, key), bound))
    for n in (2048, 8192):
        # ">= 1.3x faster than the reference" as a ratio that must stay below its bound: auto / reference.
        ref, auto = at(768, 768, 768, n, "reference_ms"), at(768, 768, 768, n, "auto_ms")
        out.append((f"auto/reference at 768x768, r=768, n={n} <= 1/1.3", None if ref is None or auto is None
                    else auto / ref, 1 / 1.3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"a smaller grid: {QUICK}")
    ap.add_argument("--full", action="store_true", help="the whole grid (shapes x ranks x tokens) instead of SUBSET")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--methods", default=METHODS, help=f"subset of {METHODS}; loldu = auto, delta, dense")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ranks", default="16,64,full")
    ap.add_argument("--skip", default="", help="points not to run, as dxk:n (e.g. 4096x4096:8192)")
    ap.add_argument("--points", default="", help="run only these points, as dxk:r:n (r may be 'full'), "
                                                 "instead of the shapes x ranks x tokens grid")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall time, or process CPU time")
    ap.add_argument("--out", default="", help="JSON name under benchmarks/results/ (default from device, dtype)")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.tokens, args.ranks = QUICK["shapes"], QUICK["tokens"], QUICK["ranks"]
    elif not args.full and not args.points:
        args.points = SUBSET
    if args.full and not args.skip:
        args.skip = "4096x4096:8192"
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    methods = args.methods.split(",")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed (pip install peft): skipping the LoRA and IA3 columns")
        methods = [m for m in methods if m not in ("lora", "ia3")]
    # "loldu" stands for its three forms, each a column of its own.
    columns = [c for m in methods for c in (FORMS if m == "loldu" else (m,))]
    skip = {tuple(s.split(":")) for s in args.skip.split(",") if s}
    grid = {}  # (d, k, r) -> [n]: one set of models per (d, k, r)
    if args.points:
        wanted = [p.split(":") for p in args.points.split(",")]
    else:
        wanted = [(shape, rank, n) for shape in args.shapes.split(",") for rank in args.ranks.split(",")
                  for n in args.tokens.split(",") if (shape, n) not in skip]
    for shape, rank, n in wanted:
        d, k = (int(v) for v in shape.split("x"))
        ns = grid.setdefault((d, k, min(d, k) if rank == "full" else int(rank)), [])
        if int(n) not in ns:
            ns.append(int(n))
    rows = []
    for (d, k, r), tokens in sorted(grid.items()):
        built = {m: b for m in methods if (b := build(m, d, k, r, dtype, dev)) is not None}
        for n in tokens:
            x = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
            steps = {}
            for m, (model, _, opt) in built.items():
                for col in (FORMS if m == "loldu" else (m,)):
                    steps[col] = step_fn(model, opt, x, col if m == "loldu" else None)
            here = [col for col in columns if col in steps]
            flops = 4 * n * d * k  # base forward + input gradient
            reps = args.reps or max(3, min(100, int(5e10 / flops)))
            times = {col: [] for col in here}
            for col in here:  # warm-up (and AdamW state allocation)
                steps[col]()
            sync()
            for i in range(reps):
                # Rotated each repetition: a step right after another model's step finds its own
                # weights out of cache (up to ~10% at 384 x 384), so every column takes every place.
                for col in here[i % len(here):] + here[:i % len(here)]:
                    t0 = clock()
                    steps[col]()
                    sync()
                    times[col].append(clock() - t0)
            med = {col: statistics.median(ts) for col, ts in times.items()}
            row = {"d": d, "k": k, "r": r, "n": n, "reps": reps}
            if "loldu" in methods:
                row["auto_form"] = loldu.ops.choose_form(n, d, k, r, dtype, dev.type)
            for col in here:
                row[f"{col}_ms"] = med[col] * 1e3
                if col != "base" and "base" in med:
                    row[f"{col}/base"] = med[col] / med["base"]
            if "loldu" in methods:
                row["auto_gap"] = med["auto"] / min(med["delta"], med["dense"]) - 1
            for m, (model, params, opt) in built.items():
                # The adapted layer's parameters and buffers (frozen weight, factors, adapter), all counted once.
                row[f"{m}_layer_bytes"] = sum(t.numel() * t.element_size()
                                              for t in list(model.parameters()) + list(model.buffers()))
                row[f"{m}_trainable"] = sum(p.numel() for p in params)
                row[f"{m}_optim_bytes"] = 0 if opt is None else sum(
                    t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
            rows.append(row)
            print("  " + ", ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                                   for key, val in row.items() if not key.endswith(("bytes", "trainable"))),
                  flush=True)
        del built
    cols = ["d", "k", "r", "n", "base_ms"] + [f"{c}/base" for c in columns if c != "base"] + \
           [c for c in ("auto_form", "auto_gap") if c in rows[0]]
    table = print_table(rows, cols)
    print()
    pcols = ["d", "k", "r"] + [f"{m}_trainable" for m in methods] + [f"{m}_layer_bytes" for m in methods] + \
            [f"{m}_optim_bytes" for m in methods]
    seen, prow = set(), []
    for row in rows:
        if (row["d"], row["k"], row["r"]) not in seen:
            seen.add((row["d"], row["k"], row["r"]))
            prow.append(row)
    params_table = print_table(prow, pcols)
    print()
    report = []
    for what, got, bound in goals(rows):
        status = "not run" if got is None else ("met" if got <= bound else f"NOT met (gap {got - bound:+.3f})")
        report.append({"goal": what, "measured": got, "status": status})
        print(f"  {what}: {'-' if got is None else f'{got:.3f}'} -> {status}")
    name = args.out or f"bench_adapter_{dev.type}_{args.dtype}" + (
        "_quick" if args.quick else "" if args.full else "_points" if args.points != SUBSET else "_subset")
    write_json(name, {"machine": machine(), "build": loldu.build_info(), "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "clock": args.clock, "skipped": sorted(map(list, skip)),
                      "points": args.points, "command": " ".join(["python", *sys.argv]),
                      "rows": rows, "table": table, "params_table": params_table, "goals": report})


if __name__ == "__main__":
    main()
