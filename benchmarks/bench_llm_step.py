"""One training step of SmolLM2-135M-Instruct (loldu.presets.smollm2_path, offline), adapted on every
linear but the head ("all-linear"), against the frozen model and PEFT's LoRA:

  frozen     no adapter; the step still computes the input gradient (inputs_embeds requires grad), so
             every linear runs its forward and input-gradient GEMMs: the floor
  loldu_r8   LoLDU rank 8, the default storage and form
  lora_r8    PEFT LoRA rank 8 (alpha 8), B started away from zero
  lu_full    LoLDU at rank="full" (each layer's min(d, k)) with factor_storage="lu": the packed LU in
             place of each weight (docs/storage.md)
  full_full  LoLDU at rank="full" with the default storage ("full": PL and U beside W0), for scale

A step: forward on a batch of token embeddings (batch x tokens), the mean of the logits as the loss,
backward, AdamW over the trainable parameters. Each variant runs in a fresh subprocess (one per
variant and round; the rounds rotate the variants' order, so machine noise hits them alike): the
median step time of its repetitions after two warm-up steps (wall clock), and its peak resident memory
during the steps: the kernel's high-water mark (VmHWM) reset after the warm-up (/proc/self/clear_refs),
free heap memory handed back first (malloc_trim), so loading and factorizing the model do not count,
while the training step's own peak (weights, activations, gradients, optimizer state) does.

    python benchmarks/bench_llm_step.py [--threads 1] [--rounds 2] [--reps 5] [--variants frozen,lu_full]
"""
import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

VARIANTS = ("frozen", "loldu_r8", "lora_r8", "lu_full", "full_full")


def build(variant: str):
    """The model for `variant`, its trainable parameters and optimizer (None when nothing trains)."""
    from transformers import AutoModelForCausalLM

    import loldu
    from loldu.presets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model.requires_grad_(False)
    if variant == "loldu_r8":
        model = loldu.inject(model, loldu.LoLDUConfig(rank=8, target_modules="all-linear"))
    elif variant in ("lu_full", "full_full"):
        storage = "lu" if variant == "lu_full" else "full"
        model = loldu.inject(model, loldu.LoLDUConfig(rank="full", target_modules="all-linear",
                                                      factor_storage=storage))
    elif variant == "lora_r8":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, (torch.optim.AdamW(params, lr=1e-4) if params else None)


def peak_rss_reset() -> None:
    """Gives free heap memory back to the system first (glibc's malloc_trim): what building the variant
    freed (the weights a factor store replaced, loading buffers) is no memory the training steps use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def child(variant: str, threads: int, reps: int, batch: int, tokens: int) -> dict:
    """Runs in the subprocess: builds the variant, times `reps` steps, returns what it measured."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, params, opt = build(variant)
    build_s = time.perf_counter() - t0
    hidden = model.get_input_embeddings().weight.shape[1]
    emb = torch.randn(batch, tokens, hidden) * 0.02

    def step():
        x = emb.clone().requires_grad_(True)
        loss = model(inputs_embeds=x).logits.float().mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    peak_rss_reset()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "step_s": statistics.median(times), "steps_s": times, "peak_rss": peak_rss_bytes(),
            "trainable": sum(p.numel() for p in params), "build_s": build_s, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.reps, args.batch, args.tokens)))
        return
    variants = args.variants.split(",")
    runs = {v: [] for v in variants}
    for i in range(args.rounds):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            cmd = [sys.executable, __file__, "--child", v, "--threads", str(args.threads), "--reps", str(args.reps),
                   "--batch", str(args.batch), "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[v].append(res)
            print(f"  round {i} {v}: step {res['step_s']:.3f} s, peak RSS {res['peak_rss'] / 2**20:.0f} MiB", flush=True)
    rows = []
    frozen = runs.get("frozen")
    for v in variants:
        step = statistics.median(r["step_s"] for r in runs[v])
        rss = max(r["peak_rss"] for r in runs[v])
        row = {"variant": v, "threads": runs[v][0]["threads"], "step_s": step,
               "step_spread_s": f"{min(r['step_s'] for r in runs[v]):.3f}-{max(r['step_s'] for r in runs[v]):.3f}",
               "peak_rss_MiB": rss / 2**20, "trainable": runs[v][0]["trainable"]}
        if frozen:
            row["step/frozen"] = step / statistics.median(r["step_s"] for r in frozen)
            row["rss/frozen"] = rss / max(r["peak_rss"] for r in frozen)
        rows.append(row)
    cols = ["variant", "threads", "step_s", "step_spread_s", "step/frozen", "peak_rss_MiB", "rss/frozen", "trainable"]
    table = print_table(rows, cols)
    write_json(f"bench_llm_step_threads{args.threads or 'default'}",
               {"machine": machine(), "batch": args.batch, "tokens": args.tokens, "reps": args.reps,
                "rounds": args.rounds, "command": " ".join(["python", *sys.argv]), "rows": rows, "runs": runs,
                "table": table})


if __name__ == "__main__":
    main()
