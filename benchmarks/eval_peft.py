"""LoLDU against its peers on a real labelled task (run by `make eval`; results in docs/evaluation.md).

Task: positive vs negative words of the AFINN-165 lexicon (loldu.datasets.afinn_split, seed 0: 1,646
train / 706 test entries, balanced), classified from the offline MiniLM's mean-pooled sentence
embedding by a linear head (loldu.datasets.MeanPoolClassifier). Every method gets the same model,
data, budget (EPOCHS epochs at batch BATCH, max length MAX_LEN, Adam without weight decay, constant
learning rate) and the same fresh head, which is trained fully at HEAD_LR by every method but
head-only (whose grid tunes the head's own rate).

Methods: LoLDU (loldu.inject) on the attention query/value or on every encoder linear, at ranks
8, 64 and min(d, k) = 384, with sigma frozen or trained, in both parametrizations ("paper":
c = sigma z - sigma0 D, "relative": c = (sigma / sigma0) D z; docs/method.md §1, §9); PEFT LoRA (r=8,
alpha=16, query/value), IA3 (key, value and the FFN output), VeRA (r=256, query/value) and RoAd
(road_1, query/value), all peft==0.21.2; full fine-tuning; head only.

Protocol: each method's learning rate is tuned on a grid of four values spanning three decades at
seed 0 (test accuracy); the best one is then run with seeds 1 and 2 (seed = head init and data
order). For each LoLDU parametrization a default learning rate is chosen from the seed-0 grids (the
grid value with the best mean accuracy over its LoLDU configurations) and run with every seed on
every LoLDU configuration; it "holds" when, on each seed, it is within DEFAULT_TOL accuracy points
of that configuration's accuracy at its tuned rate with the same seed.

Measured: trainable parameters (the head included), adapter bytes (what each library saves:
loldu.save_adapter, PEFT's save_pretrained, a safetensors file of the whole model or the head),
test accuracy, time per training step (the median of each run, and a side-by-side measurement:
one process runs one step of each method in turn, so outside load falls on all alike; compare the
ratios to head-only, not the absolute numbers) and peak memory (a fresh process per method, 8
training steps and a test batch: its resource.getrusage(RUSAGE_SELF).ru_maxrss).

    python benchmarks/eval_peft.py [--epochs N] [--workers N] [--resume] [--only NAME ...]

--candidates: the defaults' evidence (docs/evaluation.md, "Choosing the defaults"). A few candidate
configurations (CANDIDATES) each run at every one of their rates with every seed, at a budget where they
converge (--epochs, 3 by default in this mode) and with ONE learning rate for every trainable parameter,
head included, as transformers.Trainer applies it; test accuracy is also scored after every epoch.
Writes results/eval_defaults.json and eval_defaults.md.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loldu import demo_task

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC_IMG = HERE.parent / "docs" / "img"
CACHE = RESULTS / "eval_cache"  # one JSON line per finished run (--resume reuses them)

EPOCHS = 1
MAX_STEPS = None  # --steps: a smoke run of the whole pipeline (its numbers mean nothing)
BATCH, MAX_LEN, HEAD_LR = demo_task.BATCH, demo_task.MAX_LEN, demo_task.HEAD_LR  # the demo's budget
SEEDS = (0, 1, 2)
DEFAULT_TOL = 1.0  # accuracy points
ONE_LR = False  # --candidates: the head trained at the method's rate too (as one Trainer learning rate)
CANDIDATE_EPOCHS = 3
# name (as in methods()) -> the rates it runs at, every one with every seed.
CANDIDATES = {
    "loldu-paper-all-r8-sigma_trained": [3e-3, 1e-2, 3e-2],
    "loldu-relative-all-r8-sigma_fixed": [3e-3, 1e-2, 3e-2],
    "lora": [2e-4, 2e-3],
    "head": [1e-2],
}
QV = ["query", "value"]

GRIDS = {
    "head": [1e-4, 1e-3, 1e-2, 1e-1],
    "full": [1e-6, 1e-5, 1e-4, 1e-3],
    "peft": [1e-4, 1e-3, 1e-2, 1e-1],
    "paper": [3e-3, 3e-2, 3e-1, 3.0],
    "relative": [1e-4, 1e-3, 1e-2, 1e-1],
}


def methods():
    """name -> spec, in the order they run: the peers, then LoLDU's relative form, then the paper's form,
    each group's most expensive first (the pool runs them in order)."""
    out = {"head": {"kind": "head", "grid": GRIDS["head"]}, "full": {"kind": "full", "grid": GRIDS["full"]}}
    for kind in ("lora", "vera", "road", "ia3"):
        out[kind] = {"kind": kind, "grid": GRIDS["peft"]}
    for param in ("relative", "paper"):
        for target in ("all", "qv"):
            for rank in (384, 64, 8):
                for scale in ("fixed", "trained"):
                    name = f"loldu-{param}-{target}-r{rank}-sigma_{scale}"
                    out[name] = {"kind": "loldu", "target": target, "rank": rank, "parametrization": param,
                                 "train_scale": scale == "trained", "grid": GRIDS[param]}
    return out


def group(spec):
    """Which barrier a method belongs to: the peers, or one LoLDU parametrization."""
    return spec.get("parametrization", "peers")


# --------------------------------------------------------------------------------------------- worker

def _build(spec, seed):
    """(model, trainable named parameters, function saving the adapter into a directory -> bytes)."""
    import torch

    import loldu
    from loldu.datasets import load_minilm_classifier

    model, _ = load_minilm_classifier(seed=seed)
    kind = spec["kind"]
    if kind == "head" or kind == "full":
        for p in model.bert.parameters():
            p.requires_grad_(kind == "full")

        def save(d):
            from safetensors.torch import save_file
            part = model if kind == "full" else model.classifier
            f = Path(d) / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in part.state_dict().items()}, str(f))
            return f.stat().st_size
    elif kind == "loldu":
        target = QV if spec["target"] == "qv" else "all-linear"
        cfg = loldu.LoLDUConfig(rank=spec["rank"], target_modules=target, train_scale=spec["train_scale"],
                                parametrization=spec["parametrization"], modules_to_save=["classifier"])
        model = loldu.inject(model, cfg)

        def save(d):
            return sum(loldu.save_adapter(model, d).values())
    else:
        import peft

        if kind == "lora":
            cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QV, modules_to_save=["classifier"])
        elif kind == "vera":
            cfg = peft.VeraConfig(r=256, target_modules=QV, modules_to_save=["classifier"])
        elif kind == "road":
            cfg = peft.RoadConfig(variant="road_1", target_modules=QV, modules_to_save=["classifier"])
        elif kind == "ia3":
            cfg = peft.IA3Config(target_modules=r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
                                 feedforward_modules=r".*layer\.\d+\.output\.dense", modules_to_save=["classifier"])
        else:
            raise ValueError(kind)
        model = peft.get_peft_model(model, cfg)

        def save(d):
            model.save_pretrained(d)
            return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file() and f.suffix == ".safetensors")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(seed)
    return model, named, save


def run_one(spec, lr, seed, data):
    """Train one method at one learning rate and seed; returns the run's record."""
    from loldu.demo_task import accuracy, predict, train

    model, named, save = _build(spec, seed)
    head = [p for n, p in named if "classifier" in n]
    body = [p for n, p in named if "classifier" not in n]
    if spec["kind"] == "head":
        groups = [{"params": head, "lr": lr}]
    else:
        groups = [{"params": body, "lr": lr}, {"params": head, "lr": lr if ONE_LR else HEAD_LR}]
    train_data, test_data = data
    if MAX_STEPS is not None:  # a smoke run: a slice of the test set
        test_data = tuple(t[:128] for t in test_data)
    acc_epochs = []
    log = train(model, groups, train_data, EPOCHS, seed, MAX_STEPS,
                on_epoch=lambda k: acc_epochs.append(accuracy(predict(model, test_data), test_data[2])))
    acc = acc_epochs[-1]
    with tempfile.TemporaryDirectory(prefix="eval-adapter-") as d:
        nbytes = save(d)
    losses = log.losses
    return {"lr": lr, "seed": seed, "acc": acc, "acc_epochs": acc_epochs, "finite": all(x == x for x in losses),
            "loss_first": losses[0],
            "loss_last": log.mean_loss(False), "step_s": log.step_s, "steps": len(losses),
            "trainable": sum(p.numel() for _, p in named), "adapter_bytes": nbytes}


def load_data():
    """(train, test) of the seed-0 split, tokenized (loldu.demo_task.encode)."""
    from loldu.datasets import afinn_split, load_minilm_tokenizer
    from loldu.demo_task import encode

    tok = load_minilm_tokenizer()
    return tuple(encode(tok, split, MAX_LEN) for split in afinn_split(0))


def time_steps(names, data, rounds, log):
    """Median seconds per training step of each method, measured side by side in this one process: every
    round runs one step of each method (in a rotated order, on the same batch), so a neighbour's load on a
    shared machine falls on all of them alike. The learning rate does not change a step's cost."""
    import torch

    from loldu.demo_task import batches, train_step

    specs = methods()
    train_data = data[0]
    models = {}
    for n in names:
        model, named, _ = _build(specs[n], 0)
        models[n] = (model.train(), torch.optim.Adam([p for _, p in named], lr=1e-12))
    g = torch.Generator().manual_seed(0)
    times = {n: [] for n in names}
    for i in range(rounds + 2):
        feeds, y = next(batches(train_data, BATCH, torch.randperm(len(train_data[2]), generator=g)[:BATCH]))
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            train_step(*models[n], feeds, y)
            if i >= 2:  # two warm-up rounds
                times[n].append(time.perf_counter() - t0)
        log(f"timing round {i + 1}/{rounds + 2}")
    return {n: statistics.median(t) for n, t in times.items()}


def quiet_child(threads):
    """A child process's set-up: its thread count, and no progress, notes or warnings on its stderr
    (which the orchestrator shows only when the child fails)."""
    import warnings

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("LOLDU_PROGRESS", "off")
    warnings.filterwarnings("ignore")


def timing_worker(args):
    quiet_child(args.threads)
    res = time_steps(args.timing, load_data(), args.rounds, lambda m: print(m, file=sys.stderr, flush=True))
    Path(args.json).write_text(json.dumps(res))


def worker(args):
    """Runs (lr, seed) pairs of one method in this process; with --pick, the grid at seed 0 first, then
    the other seeds at its best learning rate. Writes one JSON object to --json."""
    quiet_child(args.threads)
    spec = methods()[args.worker]
    data = load_data()
    runs = []
    cache = CACHE / f"{args.worker}.jsonl"
    done = {}
    if args.resume and cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            if r.get("epochs") == EPOCHS and r.get("max_steps") == MAX_STEPS and r.get("one_lr", False) == ONE_LR:
                done[(r["lr"], r["seed"])] = r

    def one(lr, seed):
        r = done.get((lr, seed))
        if r is None:
            r = run_one(spec, lr, seed, data)
            r["epochs"], r["max_steps"], r["one_lr"] = EPOCHS, MAX_STEPS, ONE_LR
            if not args.no_cache:
                with open(cache, "a") as f:
                    f.write(json.dumps(r) + "\n")
        runs.append(r)
        print(f"  {args.worker} lr={lr:g} seed={seed}: acc {r['acc']:.2f}", file=sys.stderr, flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    for lr, seed in [tuple(json.loads(p)) for p in args.pairs]:
        one(lr, seed)
    if args.pick:
        grid = [r for r in runs if r["seed"] == 0]
        best = max(grid, key=lambda r: (r["finite"], r["acc"]))["lr"]
        for seed in SEEDS[1:]:
            one(best, seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    Path(args.json).write_text(json.dumps({"method": args.worker, "runs": runs, "peak_rss_bytes": peak}))


# --------------------------------------------------------------------------------------- orchestrator

def run_child(what, options):
    """Runs this script in a fresh process with `options` and a --json file to write; returns what it wrote."""
    with tempfile.NamedTemporaryFile(prefix="eval-", suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, __file__, "--json", out, *options], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def spawn(name, pairs, pick, threads, log, resume=False):
    options = ["--worker", name, "--threads", str(threads), "--epochs", str(EPOCHS)]
    options += ["--steps", str(MAX_STEPS)] if MAX_STEPS else []
    options += ["--pick"] if pick else []
    options += ["--resume"] if resume else []
    options += ["--one-lr"] if ONE_LR else []
    options += ["--pairs", *[json.dumps(p) for p in pairs]]
    t0 = time.perf_counter()
    res = run_child(name, options)
    log(f"{name}: {len(pairs)}{' + seeds' if pick else ''} runs in {time.perf_counter() - t0:.0f} s")
    return res


def judge_defaults(table, defaults):
    for d in defaults.values():
        for n, p in d["per_config"].items():
            p["tuned_mean"], p["tuned_seeds"] = table[n]["acc_mean"], table[n]["acc_seeds"]
            # Seed by seed (same head init and data order): the default may lose at most DEFAULT_TOL points.
            p["holds"] = all(a >= b - DEFAULT_TOL for a, b in zip(p["acc_seeds"], p["tuned_seeds"]))
        d["holds"] = all(p["holds"] for p in d["per_config"].values())


def spawn_memory(name, lr, args):
    options = ["--worker", name, "--threads", str(args.threads), "--epochs", "1", "--steps", str(args.memory_steps),
               "--no-cache", "--pairs", json.dumps([lr, 0])]
    return run_child(f"{name} (memory)", options)["peak_rss_bytes"]


def summarize(records):
    """Per method: best lr at seed 0, mean/std over seeds at it, trainable, bytes, step time, peak."""
    import math

    specs = methods()
    table = {}
    for name, rec in records.items():
        runs = rec["runs"]
        grid = {r["lr"]: r for r in runs if r["seed"] == 0 and r.get("phase", "grid") == "grid"}
        best = max(grid.values(), key=lambda r: (r["finite"], r["acc"]))["lr"]
        at = [r for r in runs if r["lr"] == best and r.get("phase", "grid") == "grid"]
        accs = [r["acc"] for r in at]
        table[name] = {
            "spec": {k: v for k, v in specs[name].items() if k != "grid"}, "grid": specs[name]["grid"],
            "grid_acc": {str(lr): grid[lr]["acc"] for lr in sorted(grid)}, "best_lr": best,
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
            "acc_seeds": accs, "trainable": at[0]["trainable"], "adapter_bytes": at[0]["adapter_bytes"],
            "step_s": statistics.median(r["step_s"] for r in runs), "peak_rss_bytes": rec["peak_rss_bytes"],
        }
    return table


def pick_default(table, param):
    """The grid value with the best mean accuracy over the parametrization's LoLDU configurations at seed 0
    (ties: the smaller worst loss against each configuration's best). Minimizing the worst loss alone
    would pick a rate so small that the adapter hardly moves (head-only accuracy loses little)."""
    names = [n for n, t in table.items() if t["spec"].get("parametrization") == param]
    grid = GRIDS[param]

    def worst(lr):
        return max(max(table[n]["grid_acc"].values()) - table[n]["grid_acc"][str(lr)] for n in names)

    def mean(lr):
        return statistics.fmean(table[n]["grid_acc"][str(lr)] for n in names)

    best = max(grid, key=lambda lr: (mean(lr), -worst(lr)))
    return best, {str(lr): {"mean_acc": mean(lr), "worst_loss": worst(lr)} for lr in grid}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--pick", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per method process (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="method processes at once (default 2)")
    ap.add_argument("--epochs", type=int, help=f"epochs per run (default {EPOCHS}; {CANDIDATE_EPOCHS} with --candidates)")
    ap.add_argument("--steps", type=int, help="cap each run at this many steps (a smoke run of the pipeline)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in results/eval_cache/ "
                    "(same epochs), e.g. after an interrupted run")
    ap.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    ap.add_argument("--out", default=str(RESULTS / "eval_peft.json"))
    ap.add_argument("--rounds", type=int, default=10, help="side-by-side timing rounds (default 10; 0: none)")
    ap.add_argument("--timing", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only rewrite the table and the plots from --out")
    ap.add_argument("--candidates", action="store_true", help="run only the defaults' candidates (CANDIDATES), "
                    f"every rate with every seed, one rate for all parameters, {CANDIDATE_EPOCHS} epochs unless --epochs")
    ap.add_argument("--one-lr", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-steps", type=int, default=8, help="steps of the per-method peak-memory run (default 8)")
    return ap.parse_args(argv)


def write_report(out, path):
    """The JSON, the markdown table and the plots of one evaluation; prints the table."""
    Path(path).write_text(json.dumps(out, indent=1))
    md = markdown(out)
    (RESULTS / "eval_peft.md").write_text(md)
    plots(out)
    print(md)


def run_methods(todo, args, log):
    """Every method's grid and seeds, one barrier per group (the peers, then each LoLDU parametrization):
    a group's default-lr check runs with the next group's grids. Returns (records, defaults)."""
    raw_path = RESULTS / "eval_runs.json"
    specs = methods()
    records, defaults = {}, {}

    def save_raw():
        raw_path.write_text(json.dumps(records, indent=1))

    with ThreadPoolExecutor(args.workers) as pool:
        pending = []
        for grp in ("peers", "relative", "paper", None):
            names = [n for n in todo if group(specs[n]) == grp]
            futs = {n: pool.submit(spawn, n, [(lr, 0) for lr in specs[n]["grid"]], True, args.threads, log,
                                   args.resume) for n in names}
            for param, fut_map in pending:
                finish_default(param, fut_map, records, defaults, log)
                save_raw()
            pending = []
            for n, f in futs.items():
                records[n] = f.result()
                save_raw()
            if grp in ("relative", "paper"):
                pending.append((grp, submit_default(pool, grp, records, args, log)))
    return records, defaults


def measure(table, args, log):
    """Adds each method's peak memory and, with --rounds, its side-by-side step time to `table`."""
    # Peak memory: one fresh process per method, one run (--memory-steps steps and a test batch of 128) at
    # its best rate; its ru_maxrss is the method's peak (the grid processes may have been resumed).
    with ThreadPoolExecutor(args.workers) as pool:
        futs = {n: pool.submit(spawn_memory, n, table[n]["best_lr"], args) for n in table}
        for n, f in futs.items():
            table[n]["peak_rss_bytes"] = f.result()
    log("peak memory measured")
    if args.rounds:
        # Time per step, side by side in one process (the per-run medians ran beside other work).
        log(f"side-by-side timing: {args.rounds} rounds of one step of each of {len(table)} methods")
        options = ["--threads", str(args.threads), "--rounds", str(args.rounds), "--timing", *table]
        for n, t in run_child("timing", options).items():
            table[n]["step_s_side_by_side"] = t


def run_meta(args, wall_s):
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "cpu": cpu_model(), "python": platform.python_version(), "epochs": EPOCHS, "batch": BATCH,
            "max_len": MAX_LEN, "head_lr": HEAD_LR, "seeds": list(SEEDS), "default_tol_points": DEFAULT_TOL,
            "threads_per_method": args.threads, "methods_at_once": args.workers, "timing_rounds": args.rounds,
            "step_time": "step_s: median over the method's own runs (beside other work); step_s_side_by_side: "
                         "median of --rounds steps run in turn with every other method in one process",
            "peak_memory": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh process per method running "
                           f"{args.memory_steps} training steps at its best rate and one test batch of 128",
            "wall_s": wall_s}
    try:
        import peft
        meta["peft"] = peft.__version__
    except ImportError:
        pass
    return meta


def main(argv=None):
    global EPOCHS, MAX_STEPS, ONE_LR
    args = parse_args(argv)
    EPOCHS = args.epochs or (CANDIDATE_EPOCHS if args.candidates else EPOCHS)
    MAX_STEPS, ONE_LR = args.steps, args.one_lr or args.candidates
    if args.candidates and not args.worker:
        return run_candidates(args)
    if args.worker:
        return worker(args)
    if args.timing and args.json:
        return timing_worker(args)
    if args.report:
        out = json.loads(Path(args.out).read_text())
        judge_defaults(out["methods"], out["defaults"])
        out["meta"]["default_tol_points"] = DEFAULT_TOL
        write_report(out, args.out)
        return 0

    RESULTS.mkdir(exist_ok=True)
    if not args.resume:
        for f in CACHE.glob("*.jsonl"):
            f.unlink()
    todo = [n for n in (args.only or methods())]
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    log(f"{len(todo)} methods, {args.workers} at a time, {args.threads} thread(s) each, {EPOCHS} epoch(s)")
    records, defaults = run_methods(todo, args, log)
    table = summarize(records)
    measure(table, args, log)
    judge_defaults(table, defaults)
    for param, d in defaults.items():
        log(f"default lr for {param}: {d['lr']:g}; holds on every config and seed: {d['holds']}")
    out = {"meta": run_meta(args, round(time.perf_counter() - t_start)), "methods": table, "defaults": defaults}
    write_report(out, args.out)
    log(f"wrote {args.out}, {RESULTS / 'eval_peft.md'} and the plots in {DOC_IMG}")
    return 0


def run_candidates(args):
    """Every candidate at each of its rates with every seed (a fresh process per candidate); writes
    results/eval_defaults.json and eval_defaults.md, and prints the table."""
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    names = [n for n in (args.only or CANDIDATES)]
    log(f"{len(names)} candidates, {args.workers} at a time, {args.threads} thread(s) each, {EPOCHS} epoch(s), "
        "one learning rate for every trainable parameter")
    CACHE.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.workers) as pool:
        futs = {n: pool.submit(spawn, n, [(lr, s) for lr in CANDIDATES[n] for s in SEEDS], False, args.threads,
                               log, True) for n in names}
        records = {n: f.result() for n, f in futs.items()}
    specs = methods()
    rows = {}
    for n, rec in records.items():
        for lr in CANDIDATES[n]:
            runs = sorted((r for r in rec["runs"] if r["lr"] == lr), key=lambda r: r["seed"])
            accs = [r["acc"] for r in runs]
            per_epoch = [statistics.fmean(r["acc_epochs"][k] for r in runs) for k in range(len(runs[0]["acc_epochs"]))]
            rows[f"{n}@{lr:g}"] = {"method": n, "label": label(n, specs[n]), "lr": lr, "acc_seeds": accs,
                                   "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs),
                                   "acc_mean_by_epoch": per_epoch, "steps": runs[0]["steps"],
                                   "trainable": runs[0]["trainable"], "adapter_bytes": runs[0]["adapter_bytes"],
                                   "step_s": statistics.median(r["step_s"] for r in runs)}
    meta = run_meta(args, round(time.perf_counter() - t_start))
    meta["one_lr"] = True
    out = {"meta": meta, "candidates": {n: CANDIDATES[n] for n in names}, "rows": rows}
    (RESULTS / "eval_defaults.json").write_text(json.dumps(out, indent=1))
    md = candidates_markdown(out)
    (RESULTS / "eval_defaults.md").write_text(md)
    print(md)
    return 0


def candidates_markdown(out):
    epochs = out["meta"]["epochs"]
    by_epoch = " / ".join(f"ep {k + 1}" for k in range(epochs))
    lines = [f"| method | lr | trainable params | test acc % (3 seeds) | mean acc by epoch ({by_epoch}) |",
             "|---|---:|---:|---:|---|"]
    for r in out["rows"].values():
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | "
                     + " / ".join(f"{a:.2f}" for a in r["acc_mean_by_epoch"]) + " |")
    return "\n".join(lines) + "\n"


def submit_default(pool, param, records, args, log):
    """Starts the default-lr runs of one parametrization (every seed its grid did not run)."""
    table = summarize(records)
    lr, worst = pick_default(table, param)
    names = [n for n, t in table.items() if t["spec"].get("parametrization") == param]
    futs = {}
    for n in names:
        have = {r["seed"] for r in records[n]["runs"] if r["lr"] == lr}
        need = [(lr, s) for s in SEEDS if s not in have]
        if need:
            futs[n] = pool.submit(spawn, n, need, False, args.threads, log, args.resume)
    log(f"{param}: default lr candidate {lr:g} (seed 0, per grid value: {worst}); "
        f"{len(futs)} configurations need more seeds at it")
    return {"lr": lr, "worst": worst, "names": names, "futs": futs}


def finish_default(param, job, records, defaults, log):
    lr = job["lr"]
    for n, f in job["futs"].items():
        extra = f.result()["runs"]
        for r in extra:
            r["phase"] = "default"
        records[n]["runs"] += extra
    per = {}
    for n in job["names"]:
        accs = {r["seed"]: r["acc"] for r in records[n]["runs"] if r["lr"] == lr}
        per[n] = {"acc_seeds": [accs[s] for s in SEEDS], "acc_mean": statistics.fmean(accs.values()),
                  "acc_std": statistics.stdev(accs.values())}
    defaults[param] = {"lr": lr, "grid_seed0": job["worst"], "per_config": per}


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def label(name, spec):
    if spec["kind"] != "loldu":
        return {"full": "full fine-tuning", "head": "head only", "lora": "LoRA r=8 (q,v)", "vera": "VeRA r=256 (q,v)",
                "road": "RoAd road_1 (q,v)", "ia3": "IA3 (k,v,ffn)"}[spec["kind"]]
    tgt = "q,v" if spec["target"] == "qv" else "all linear"
    return (f"LoLDU {spec['parametrization']} r={spec['rank']} ({tgt}), sigma "
            f"{'trained' if spec['train_scale'] else 'frozen'}")


def markdown(out):
    t = out["methods"]
    key = "step_s_side_by_side" if all("step_s_side_by_side" in r for r in t.values()) else "step_s"
    head_step = t["head"][key] if "head" in t else None
    head_params = t["head"]["trainable"] if "head" in t else 0
    lines = ["| method | trainable params (head excluded) | adapter bytes | best lr | test acc % (3 seeds) | step ms "
             "| step / head-only | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(t.items(), key=lambda kv: -kv[1]["acc_mean"]):
        ratio = f"{r[key] / head_step:.1f}x" if head_step else "-"
        own = r["trainable"] - head_params if r["spec"]["kind"] not in ("head", "full") else r["trainable"]
        lines.append(f"| {label(name, r['spec'])} | {own:,} | {r['adapter_bytes']:,} | {r['best_lr']:g} | "
                     f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r[key] * 1e3:.0f} | {ratio} | "
                     f"{r['peak_rss_bytes'] / 2 ** 20:.0f} |")
    for param, d in out["defaults"].items():
        lines += ["", f"Default learning rate, {param} parametrization: {d['lr']:g} "
                      f"(holds within {out['meta']['default_tol_points']:g} point on every seed and configuration: "
                      f"{'yes' if d['holds'] else 'no'})", "",
                  "| configuration | acc % at the default (3 seeds) | tuned acc % | holds |", "|---|---:|---:|---|"]
        for n, p in d["per_config"].items():
            lines.append(f"| {label(n, t[n]['spec'])} | {p['acc_mean']:.2f} ± {p['acc_std']:.2f} | "
                         f"{p['tuned_mean']:.2f} | {'yes' if p['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plots(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOC_IMG.mkdir(parents=True, exist_ok=True)
    t = out["methods"]
    colors = {"paper": "tab:blue", "relative": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, r in t.items():
        s = r["spec"]
        if s["kind"] == "loldu":
            c = colors[s["parametrization"]]
            mk = "o" if s["target"] == "qv" else "s"
            fill = c if s["train_scale"] else "none"
            ax.errorbar(r["trainable"], r["acc_mean"], yerr=r["acc_std"], fmt=mk, color=c, mfc=fill, capsize=2)
        else:
            ax.errorbar(r["trainable"], r["acc_mean"], yerr=r["acc_std"], fmt="^", color="tab:red", capsize=2)
            ax.annotate(label(name, s), (r["trainable"], r["acc_mean"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color="tab:blue", label="LoLDU paper, q,v"),
               Line2D([], [], marker="s", ls="", color="tab:blue", label="LoLDU paper, all linear"),
               Line2D([], [], marker="o", ls="", color="tab:green", label="LoLDU relative, q,v"),
               Line2D([], [], marker="s", ls="", color="tab:green", label="LoLDU relative, all linear"),
               Line2D([], [], marker="o", ls="", color="gray", mfc="none", label="hollow: sigma frozen"),
               Line2D([], [], marker="^", ls="", color="tab:red", label="peers")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head of 770 included, log scale)")
    ax.set_ylabel("test accuracy % (mean ± std, 3 seeds, best lr)")
    ax.set_title("AFINN-165 positive vs negative, MiniLM, " + f"{out['meta']['epochs']} epoch(s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOC_IMG / "eval_acc_vs_params.png", dpi=110)
    plt.close(fig)

    panels = [("LoLDU paper", lambda s: s.get("parametrization") == "paper"),
              ("LoLDU relative", lambda s: s.get("parametrization") == "relative"),
              ("peers", lambda s: s["kind"] != "loldu")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharey=True)
    for ax, (title, keep) in zip(axes, panels):
        for name, r in t.items():
            if not keep(r["spec"]):
                continue
            lrs = sorted(float(k) for k in r["grid_acc"])
            sp = r["spec"]
            style = {}
            if sp["kind"] == "loldu":  # colour: targets and rank; dashed: sigma trained
                combo = ("qv", "all").index(sp["target"]) * 3 + (8, 64, 384).index(sp["rank"])
                style = {"color": plt.cm.tab10(combo), "ls": "--" if sp["train_scale"] else "-"}
            ax.plot(lrs, [r["grid_acc"][str(lr)] for lr in lrs], marker="o", label=label(name, sp), **style)
        ax.set_xscale("log")
        ax.set_title(title + " (seed 0)")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("test accuracy %")
    fig.tight_layout()
    fig.savefig(DOC_IMG / "eval_acc_vs_lr.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
