"""The `loldu` command line (also `python -m loldu`).

    loldu export --base <model dir | package.module:factory> [--adapter <adapter dir>] --out model.onnx
                 [--fp16] [--adapter-inputs] [--opset N] [--no-check]

A model dir is a transformers directory, loaded with AutoTokenizer and the model class the adapter
was trained on (recorded in the adapter file, e.g. BertForSequenceClassification with its task
head and number of labels; AutoModel without an adapter), local_files_only=True; the example
inputs are tokenized sentences (input_ids, attention_mask) with dynamic batch and sequence axes.
A module spec names a factory returning an nn.Module; its example inputs come from
`example_inputs()` in the same module (or a method of the model), returning a tensor, a tuple of
tensors or a dict of them; it is called twice, for tracing and for the parity check.

Errors print one line, `loldu export: error: ...`, and exit with status 1; no .onnx file is left behind.
Warnings print one line each, `loldu export: warning: ...`.
"""
import argparse
import importlib
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
    header, tensors = adapter if adapter is not None else ({}, {})
    name = header.get("model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        return transformers.AutoModel, {}
    kwargs = {}
    for entry in header.get("saved_modules", []):
        w = tensors.get(f"saved.{entry['name']}.weight")
        if entry["name"].rpartition(".")[2] in ("classifier", "score") and w is not None and w.dim() == 2:
            kwargs["num_labels"] = int(w.shape[0])  # the head's output size decides the model's label count
    return cls, kwargs


def _load_transformers(directory: Path, adapter: Optional[tuple] = None):
    try:
        import transformers
    except ImportError as e:
        raise CliError(f"--base {directory}: loading a model directory needs transformers ({e})") from None
    cls, kwargs = _model_class(transformers, adapter)
    verbosity = transformers.logging.get_verbosity()
    if kwargs:  # the head comes from the adapter: transformers' report of a missing (new) head is noise here
        transformers.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise CliError(f"--base {directory}: not a loadable transformers model directory for {cls.__name__} "
                       f"({type(e).__name__}: {_one_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)

    def make(sentences):
        enc = tokenizer(sentences, padding=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}

    return model, (lambda: make(TRACE_SENTENCES)), (lambda: make(CHECK_SENTENCES))


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
    if args.adapter and not Path(args.adapter).is_dir():
        raise CliError(f"--adapter {args.adapter}: no such adapter directory")
    adapter = None
    if args.adapter:
        from loldu.adapter_io import read_adapter

        header, _, tensors = read_adapter(args.adapter)
        adapter = (header, tensors)
    model, trace_inputs, check_inputs = load_base(args.base, adapter)
    model.eval()
    if args.adapter:
        model = loldu.load_adapter(model, args.adapter)
    report = lx.to_onnx(model, trace_inputs(), out, merge=not args.adapter_inputs, adapter_inputs=args.adapter_inputs,
                        dtype="fp16" if args.fp16 else "fp32", opset=args.opset,
                        check_inputs=None if args.no_check else check_inputs())
    print(report)
    if args.adapter_inputs:
        print(f"  feed an adapter: loldu.export.OrtRunner({str(out)!r}).run(inputs, adapter=<adapter dir>)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loldu", description="LoLDU parameter-efficient fine-tuning tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="merge an adapter into its base and export to ONNX",
                        description="Merge a LoLDU adapter into its base model and export it to ONNX, "
                                    "checked with onnx.checker and against PyTorch in ONNX Runtime.")
    ex.add_argument("--base", required=True, help="transformers model directory, or package.module:factory")
    ex.add_argument("--adapter", help="adapter directory (loldu.save_adapter); omit to export the base model")
    ex.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    ex.add_argument("--fp16", action="store_true", help="export weights and float inputs/outputs in fp16")
    ex.add_argument("--adapter-inputs", action="store_true",
                    help="do not merge: make every adapted layer's c a graph input (one file for all adapters)")
    from loldu.export.onnx_export import DEFAULT_OPSET

    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    ex.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
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
    except OSError as e:  # a file-system failure loldu did not name itself (its message names the path)
        print(f"loldu {args.command}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    except RecursionError as e:
        print(f"loldu {args.command}: error: RecursionError: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
