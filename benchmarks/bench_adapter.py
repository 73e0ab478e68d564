"""One training step of an adapted linear layer, side by side in one run:

  base       the frozen nn.Linear alone: forward + input gradient (the floor)
  loldu      loldu.inject on that Linear: the fused op (forward, backward, AdamW over z)
  lora       PEFT's LoRA at the same rank (benchmark-only dependency: pip install peft)
  reference  the paper's released approach: a torch.nn.utils.parametrize parametrization that
             forms the dense update P @ L_r diag(z) U_r through a (d, d) permutation matrix
             every forward

The methods run round-robin within each repetition, so machine noise hits them alike; the
table gives per-method medians and ratios to the base step, plus trainable-parameter counts and
optimizer-state bytes.

    python benchmarks/bench_adapter.py [--quick] [--device cuda] [--dtype bf16]
"""
import argparse
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
    lin = nn.Linear(k, d, bias=True).to(device=device, dtype=dtype)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    model = nn.Sequential(lin)
    if method == "loldu":
        loldu.inject(model, loldu.LoLDUConfig(rank=r, target_modules=["0"]))
    elif method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
        for n, p in model.named_parameters():  # start away from B = 0 so every matmul does work
            if "lora_B" in n:
                nn.init.normal_(p, std=1e-3)
    elif method == "reference":
        parametrize.register_parametrization(lin, "weight", DenseLoLDU(lin.weight.detach(), r))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, params, opt


def step_fn(model, opt, x):
    def step():
        y = model(x)
        y.backward(torch.ones_like(y))  # a fixed upstream gradient; x.grad is produced too
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes and fewer repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--methods", default="base,loldu,lora,reference")
    ap.add_argument("--tokens", default="8,512,2048")
    ap.add_argument("--shapes", default="1024x1024,4096x4096")
    ap.add_argument("--ranks", default="8,16,64")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    methods = args.methods.split(",")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed (pip install peft): skipping the LoRA column")
        methods = [m for m in methods if m != "lora"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    ranks = [int(v) for v in args.ranks.split(",")]
    if args.quick:
        shapes, tokens, ranks = [(256, 256)], [8, 64], [8]
    rows = []
    for d, k in shapes:
        for r in ranks:
            built = {m: build(m, d, k, r, dtype, dev) for m in methods}
            for n in tokens:
                x = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
                steps = {m: step_fn(model, opt, x) for m, (model, _, opt) in built.items()}
                flops = 4 * n * d * k  # base forward + input gradient
                reps = args.reps or max(3, min(30, int(2e10 / flops)))
                times = {m: [] for m in methods}
                for m in methods:  # warm-up (and AdamW state allocation)
                    steps[m]()
                sync()
                for _ in range(reps):
                    for m in methods:
                        t0 = time.perf_counter()
                        steps[m]()
                        sync()
                        times[m].append(time.perf_counter() - t0)
                med = {m: statistics.median(ts) for m, ts in times.items()}
                row = {"d": d, "k": k, "r": r, "n": n, "reps": reps}
                for m in methods:
                    row[f"{m}_ms"] = med[m] * 1e3
                    if m != "base":
                        row[f"{m}/base"] = med[m] / med["base"] if "base" in med else None
                if "loldu" in med and "lora" in med:
                    row["lora/loldu"] = med["lora"] / med["loldu"]
                if "loldu" in med and "reference" in med:
                    row["reference/loldu"] = med["reference"] / med["loldu"]
                for m, (_, params, opt) in built.items():
                    row[f"{m}_trainable"] = sum(p.numel() for p in params)
                    row[f"{m}_optim_bytes"] = 0 if opt is None else sum(
                        t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))
                rows.append(row)
                print("  " + ", ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                                       for key, val in row.items() if not key.endswith("bytes")), flush=True)
            del built
    cols = ["d", "k", "r", "n"] + [f"{m}_ms" for m in methods] + \
           [c for c in ("loldu/base", "lora/base", "reference/base", "lora/loldu", "reference/loldu") if c in rows[0]]
    table = print_table(rows, cols)
    print()
    pcols = ["d", "k", "r"] + [f"{m}_trainable" for m in methods] + [f"{m}_optim_bytes" for m in methods]
    seen, prow = set(), []
    for row in rows:
        if (row["d"], row["k"], row["r"]) not in seen:
            seen.add((row["d"], row["k"], row["r"]))
            prow.append(row)
    params_table = print_table(prow, pcols)
    write_json(f"bench_adapter_{dev.type}_{args.dtype}" + ("_quick" if args.quick else ""),
               {"machine": machine(), "build": loldu.build_info(), "dtype": args.dtype, "rows": rows,
                "table": table, "params_table": params_table})


if __name__ == "__main__":
    main()
