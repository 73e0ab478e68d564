"""Merge-and-export to ONNX: a LoLDU model becomes a plain ONNX graph, or one with `c` as inputs.

Exporter: torch.onnx.export(dynamo=False), the TorchScript tracer. On torch 2.13 it exports MiniLM in
about 2 s on 2 CPU cores (the dynamo exporter takes about 10 s and needs the extra onnxscript
package), and tracing records whatever torch ops the forward runs, so the adapted layers only have
to switch from the fused op (unknown to ONNX) to their plain-torch path while exporting.

Three forms:
- merge=True (default): ΔW is folded into the weights of a copy, which is then a plain model; the
  graph is operator-for-operator the base model's graph.
- merge=False: the active adapter's c is baked in as constants; the adapter runs as extra MatMuls.
- merge=False, adapter_inputs=True: every adapted layer's c (r,) fp32 is a graph input named
  `loldu.c.<layer name>`, so one file serves every adapter trained on the same base. The file's
  metadata records each layer's D and base-weight fingerprint, so `adapter_feeds` can turn an
  adapter directory into those inputs, refusing an adapter trained on another base.
"""
import contextlib
import copy
import json
import os
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from loldu.adapter_io import atomic_paths
from loldu.errors import ExportError
from loldu.layer import coefficients_from
from loldu.model import adapted_layers, merge_and_unload
from loldu.state import AdapterState

C_PREFIX = "loldu.c."
META_KEY = "loldu.adapter_inputs"
DEFAULT_OPSET = 17
# Parity bounds, max |ORT - PyTorch| over all outputs. fp32: absolute. fp16 (ORT in fp16 against the
# fp32 PyTorch model): FP16_BOUND * max(1, max |y|), about 20 fp16 roundings of the largest output
# (MiniLM, 6 layers, merged: 0.04 against a bound of 0.12).
FP32_BOUND = 1e-4
FP16_BOUND = 2e-2


def parity_bound(dtype: str, reference: Sequence[torch.Tensor]) -> float:
    """The max abs difference allowed between ORT's and PyTorch's outputs for an export in `dtype`."""
    if dtype == "fp32":
        return FP32_BOUND
    peak = max((float(t.detach().abs().max()) for t in reference if t.numel()), default=0.0)
    return FP16_BOUND * max(1.0, peak)


@dataclass
class ExportReport:
    """What to_onnx wrote. op_counts: {ONNX op type: nodes}; adapter_inputs: the c inputs' names."""

    path: str
    bytes: int
    dtype: str
    opset: int
    merged: Optional[str]
    input_names: List[str]
    output_names: List[str]
    adapter_inputs: List[str]
    op_counts: Dict[str, int]
    export_seconds: float
    max_abs_diff: Optional[float] = None
    parity_bound: Optional[float] = None
    provider: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.bytes / 1e6:.2f} MB, {self.dtype}, opset {self.opset}) "
                 f"in {self.export_seconds:.1f} s",
                 f"  merged adapter: {self.merged if self.merged else 'none'}",
                 f"  inputs: {', '.join(n for n in self.input_names if n not in self.adapter_inputs)}",
                 f"  outputs: {', '.join(self.output_names)}"]
        if self.adapter_inputs:
            lines.append(f"  adapter inputs: {len(self.adapter_inputs)} c vectors ({self.adapter_inputs[0]}, ...)")
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"  nodes: {sum(self.op_counts.values())} ({top}, ...)")
        if self.max_abs_diff is not None:
            lines.append(f"  parity ({self.provider}): max |ORT - PyTorch| = {self.max_abs_diff:.3g} "
                         f"(bound {self.parity_bound:.3g})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def op_counts(model) -> Dict[str, int]:
    """{op type (prefixed with its domain unless the default one): count} of an ONNX file or ModelProto."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return dict(Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                        for n in proto.graph.node))


# -- inputs and outputs ----------------------------------------------------------------------------
def _normalize_inputs(example_inputs) -> Tuple[List[str], List[torch.Tensor], bool]:
    """(names, tensors, by_keyword). A dict (e.g. a tokenizer's output) is passed by keyword."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        items = [(k, v) for k, v in example_inputs.items()]
        by_kw = True
    elif isinstance(example_inputs, (tuple, list)):
        items = [(f"input_{i}" if len(example_inputs) > 1 else "input", v) for i, v in enumerate(example_inputs)]
        by_kw = False
    else:
        raise ExportError(f"loldu.export: example_inputs must be a tensor, a tuple of tensors or a dict of "
                          f"name -> tensor, got {type(example_inputs).__name__}")
    for name, v in items:
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"loldu.export: example input {name!r} is a {type(v).__name__}, not a tensor")
    return [k for k, _ in items], [v for _, v in items], by_kw


def _flatten_outputs(out) -> Tuple[List[str], List[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if isinstance(out, Mapping):  # transformers ModelOutput is an OrderedDict of the fields that are set
        items = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    elif isinstance(out, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    else:
        items = []
    if not items:
        raise ExportError(f"loldu.export: the model returned {type(out).__name__} with no tensors to export")
    return [k for k, _ in items], [v for _, v in items]


class _Traced(nn.Module):
    """Positional tensors in, a tuple of tensors out (what the TorchScript tracer wants).

    The last len(layers) positional inputs, if any, are the c vectors of the adapted layers.
    """

    def __init__(self, model: nn.Module, names: List[str], by_kw: bool, layers: List[nn.Module]):
        super().__init__()
        self.model = model
        self.names, self.by_kw = names, by_kw
        self.layers = layers  # a plain list: the layers stay registered under self.model only
        self.out_names: List[str] = []

    def forward(self, *args):
        n = len(self.names)
        inputs, cs = args[:n], args[n:]
        for layer, c in zip(self.layers, cs):
            layer._export_c = c
        try:
            out = self.model(**dict(zip(self.names, inputs))) if self.by_kw else self.model(*inputs)
        finally:
            for layer in self.layers:
                layer._export_c = None
        self.out_names, tensors = _flatten_outputs(out)
        return tuple(tensors)


def _default_dynamic_axes(in_names, inputs, out_names, outputs, c_names) -> Dict[str, Dict[int, str]]:
    """Axis 0 of every input is 'batch'; axis 1 of integer inputs of rank >= 2 (token ids, masks) is
    'sequence'. An output axis is named when its size equals the batch (axis 0) or sequence (axis 1)."""
    axes: Dict[str, Dict[int, str]] = {}
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    seq = None
    for name, t in zip(in_names, inputs):
        if t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if t.dim() >= 2 and not t.is_floating_point():
            axes[name][1] = "sequence"
            seq = t.shape[1]
    for name, t in zip(out_names, outputs):
        a = {}
        if t.dim() >= 1 and batch is not None and t.shape[0] == batch:
            a[0] = "batch"
        if t.dim() >= 2 and seq is not None and t.shape[1] == seq:
            a[1] = "sequence"
        if a:
            axes[name] = a
    return axes


# -- the export ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _plain_layers(layers):
    for layer in layers:
        layer._export_plain = True
    try:
        yield
    finally:
        for layer in layers:
            layer._export_plain = False


def _adapter_metadata(layers: List[Tuple[str, nn.Module]]) -> str:
    from loldu.adapter_io import fingerprint

    rows = []
    for name, layer in layers:
        rows.append({"layer": name, "input": C_PREFIX + name, "rank": layer.rank,
                     "pivots": layer.loldu_pivots.tolist(),
                     "fingerprint": fingerprint(layer.base_matrix(), layer.loldu_pivots).hex(),
                     # fp32 values printed by Python's repr round-trip exactly.
                     "D": [float(v) for v in layer.loldu_D.float().cpu()]})
    return json.dumps({"format": "loldu-onnx-adapter-inputs", "version": 1, "layers": rows})


def _prepare(model: nn.Module, merge: bool, adapter_inputs: bool, adapter_name: Optional[str], dtype: str):
    """A private, eval-mode copy ready to trace, and (merged adapter name, adapted layers, notes)."""
    work = copy.deepcopy(model)
    work.eval()
    state = AdapterState.of(work)
    layers = state.layers
    merged, notes = None, []
    if layers:
        if adapter_name is not None:
            state.require_exists(adapter_name, "loldu.export", ExportError)
        already = state.merged
        if merge:
            name = adapter_name or already or state.active
            if already is not None and already != name:
                raise ExportError(f"loldu.export: the model has adapter {already!r} merged, not {name!r}; unmerge it first")
            merge_and_unload(work, name)  # fp32 ΔW, cast back: before any fp16 cast below
            merged, layers = name, []
        else:
            if already is not None:
                raise ExportError(f"loldu.export: merge=False but adapter {already!r} is merged into the model; "
                                  "call loldu.unmerge first")
            if adapter_name is not None:
                state.set_active(adapter_name, trainable=False)
            if not adapter_inputs and state.active is None:
                notes.append("no active adapter: exported the base model's computation")
    elif adapter_inputs:
        raise ExportError("loldu.export: adapter_inputs=True needs a model with LoLDU layers (loldu.inject or "
                          "loldu.load_adapter first)")
    # Recorded before any fp16 cast: D and the fingerprints are those of the trained-on base.
    meta = _adapter_metadata(layers) if adapter_inputs else None
    if dtype == "fp16":
        work.half()
        # c = sigma0 (z - D) + (sigma - sigma0) z must be computed from fp32 z, D and sigma: in fp16
        # z - D loses most of its digits for a small change (c off by 15%). Restore them from the caller's model.
        src = dict(adapted_layers(model))
        with torch.no_grad():
            for n, layer in layers:
                orig = src[n]
                layer.loldu_D = orig.loldu_D.detach().to(layer.loldu_D.device, torch.float32).clone()
                for k in layer.loldu_z.keys():
                    layer.loldu_z[k].data = orig.loldu_z[k].detach().to(layer.loldu_D.device, torch.float32).clone()
                    layer.loldu_sigma[k].data = orig.loldu_sigma[k].detach().to(layer.loldu_D.device, torch.float32).clone()
        # The tracer's scaled_dot_product_attention symbol mixes fp32 into fp16 graphs; transformers'
        # eager attention exports cleanly.
        if hasattr(work, "set_attn_implementation"):
            try:
                work.set_attn_implementation("eager")
            except Exception:  # pragma: no cover - a model without that switch keeps its attention
                pass
    return work, merged, layers, notes, meta


def to_onnx(model: nn.Module, example_inputs, path, *, merge: bool = True, dtype: str = "fp32",
            dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None, adapter_inputs: bool = False,
            adapter_name: Optional[str] = None, input_names: Optional[List[str]] = None,
            output_names: Optional[List[str]] = None, opset: int = DEFAULT_OPSET, check_inputs=None,
            provider: str = "auto") -> ExportReport:
    """Exports `model` to the ONNX file `path` and returns an ExportReport; `model` is not changed.

    example_inputs: a tensor, a tuple of tensors (positional) or a dict name -> tensor (keyword, e.g.
        a tokenizer's output); floating inputs are cast to fp16 when dtype="fp16".
    merge: fold adapter `adapter_name` (default: the active one) into the weights of a copy: the
        graph then holds exactly the base model's operators. merge=False keeps the adapter as extra
        MatMuls with c baked in, or with adapter_inputs=True as graph inputs `loldu.c.<layer>` (r,) fp32.
    dtype: "fp32" or "fp16" (weights and float inputs/outputs in fp16; c inputs stay fp32).
    dynamic_axes: torch.onnx's {name: {axis: label}}; default: axis 0 of every input is "batch" and
        axis 1 of integer inputs of rank >= 2 is "sequence" (and the matching output axes). {} = static.
    check_inputs: fresh inputs like example_inputs; if given, the file is run in ONNX Runtime on them
        and compared with the PyTorch model (the caller's, unmerged: the true reference); above the
        bound (parity_bound) it is an ExportError and no file is written.
    The file is written to a temporary file in the same directory, checked with onnx.checker, then
    renamed: a failure or a kill never leaves a partial `path` behind, and the temporaries that killed
    exports left next to `path` are removed first (loldu.adapter_io.clean_stale_temps). Raises
    ExportError, also for file-system failures (naming `path`).
    """
    import onnx

    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"loldu.export: dtype must be 'fp32' or 'fp16', got {dtype!r}")
    if adapter_inputs and merge:
        raise ExportError("loldu.export: adapter_inputs=True needs merge=False (a merged adapter is no input)")
    if not isinstance(model, nn.Module):
        raise ExportError(f"loldu.export: model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"loldu.export: output path {str(path)!r} must end in .onnx")
    if path.is_dir():
        raise ExportError(f"loldu.export: output path {str(path)!r} is a directory")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise ExportError(f"loldu.export: output path {str(path)!r}: directory {str(path.parent)!r} {what}")
    names, inputs, by_kw = _normalize_inputs(example_inputs)
    if input_names is not None:
        if len(input_names) != len(inputs):
            raise ExportError(f"loldu.export: {len(input_names)} input_names for {len(inputs)} example inputs")
        names_out = list(input_names)
    else:
        names_out = names
    t0 = time.perf_counter()
    work, merged, layers, notes, meta = _prepare(model, merge, adapter_inputs, adapter_name, dtype)
    if dtype == "fp16":
        inputs = [t.half() if t.is_floating_point() else t for t in inputs]
    c_layers = layers if adapter_inputs else []
    c_names = [C_PREFIX + n for n, _ in c_layers]
    c_examples = [layer.coefficients(layer.active_adapter or next(iter(layer.loldu_z))).detach().float()
                  for _, layer in c_layers]
    wrapper = _Traced(work, names, by_kw, [layer for _, layer in c_layers]).eval()
    with torch.no_grad(), _plain_layers([layer for _, layer in layers]):
        try:
            sample = wrapper(*inputs, *c_examples)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"loldu.export: the model failed on example_inputs ({type(e).__name__}: {e})") from None
    out_names = list(output_names) if output_names is not None else wrapper.out_names
    if len(out_names) != len(sample):
        raise ExportError(f"loldu.export: {len(out_names)} output_names for {len(sample)} outputs")
    all_in = names_out + c_names
    if dynamic_axes is None:
        dynamic_axes = _default_dynamic_axes(names_out, inputs, out_names, list(sample), c_names)
    unknown = set(dynamic_axes) - set(all_in) - set(out_names)
    if unknown:
        raise ExportError(f"loldu.export: dynamic_axes names {sorted(unknown)} are neither inputs {all_in} "
                          f"nor outputs {out_names}")
    with _os_errors_named(path), atomic_paths([path]) as (tmp,):
        with torch.no_grad(), _plain_layers([layer for _, layer in layers]), warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice and tracer warnings about Python
            # conditionals in transformers' mask code (shape checks that hold for every input).
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(wrapper, tuple(inputs) + tuple(c_examples), tmp, dynamo=False,
                                  input_names=all_in, output_names=out_names, dynamic_axes=dynamic_axes,
                                  opset_version=opset, do_constant_folding=True)
            except Exception as e:
                raise ExportError(f"loldu.export: torch.onnx.export failed ({type(e).__name__}: {e})") from None
        proto = onnx.load(tmp)
        if c_layers:
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, meta
            onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:
            raise ExportError(f"loldu.export: onnx.checker rejected the exported graph ({type(e).__name__}: {e})") from None
        graph_inputs = [i.name for i in proto.graph.input]
        missing = [n for n in c_names if n not in graph_inputs]
        if missing:
            raise ExportError(f"loldu.export: adapter inputs {missing[:3]} were optimized out of the graph "
                              "(the forward does not use those layers?)")
        counts = op_counts(proto)
        report = ExportReport(path=str(path), bytes=os.path.getsize(tmp), dtype=dtype, opset=opset, merged=merged,
                              input_names=graph_inputs, output_names=out_names, adapter_inputs=c_names,
                              op_counts=counts, export_seconds=time.perf_counter() - t0, notes=notes)
        if check_inputs is not None:
            _parity(report, tmp, model, check_inputs, c_layers, adapter_name, provider, names, names_out)
    return report


@contextlib.contextmanager
def _os_errors_named(path: Path):
    """A file-system failure while writing `path` (read-only or vanished directory, disk full) as an
    ExportError naming it."""
    try:
        yield
    except OSError as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ExportError(f"loldu.export: cannot write {str(path)!r} ({reason}); nothing was written there") from None


def pytorch_outputs(model: nn.Module, inputs, adapter_name: Optional[str] = None) -> List[torch.Tensor]:
    """The model's outputs (flattened as in the export) in eval mode under no_grad, as fp32 tensors.

    With `adapter_name`, that adapter is made active for the call (on the caller's model, restored after).
    """
    names, tensors, by_kw = _normalize_inputs(inputs)
    was_training = model.training
    try:
        with AdapterState.of(model).using(adapter_name):
            model.eval()
            with torch.no_grad():
                out = model(**dict(zip(names, tensors))) if by_kw else model(*tensors)
    finally:
        model.train(was_training)
    return [t.float() for t in _flatten_outputs(out)[1]]


def _parity(report: ExportReport, onnx_path: str, model: nn.Module, check_inputs, c_layers, adapter_name, provider,
            example_names: List[str], export_names: List[str]):
    from .ort_runner import OrtRunner

    names, tensors, by_kw = _normalize_inputs(check_inputs)
    if by_kw:  # matched to the example inputs by keyword, whatever the dict's order
        given = dict(zip(names, tensors))
        tensors = [given.get(n) for n in example_names]
    if len(tensors) != len(export_names) or any(t is None for t in tensors):
        raise ExportError(f"loldu.export: check_inputs {names} do not match example_inputs {example_names}")
    ref = pytorch_outputs(model, check_inputs, adapter_name)
    runner = OrtRunner(onnx_path, provider=provider, quiet=True)
    # Paired by name: the exporter drops inputs the graph does not use, so positions can shift.
    graph = set(report.input_names)
    feeds = OrderedDict((n, t) for n, t in zip(export_names, tensors) if n in graph)
    if report.dtype == "fp16":
        feeds = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in feeds.items())
    if c_layers:
        feeds.update(adapter_feeds(model, adapter_name=adapter_name))
    outs = runner.run(feeds)
    diff = max(float((torch.as_tensor(o).float() - r).abs().max()) if r.numel() else 0.0
               for o, r in zip(outs.values(), ref))
    report.max_abs_diff, report.parity_bound, report.provider = diff, parity_bound(report.dtype, ref), runner.provider
    if not diff <= report.parity_bound:  # NaN fails too
        raise ExportError(f"loldu.export: parity check failed: max |ORT - PyTorch| = {diff:.3g} exceeds the "
                          f"{report.dtype} bound {report.parity_bound:.3g}; {report.path} not written")


# -- adapter inputs ------------------------------------------------------------------------------
def adapter_metadata(onnx_model) -> List[dict]:
    """The per-layer records (layer, input, rank, pivots, fingerprint, D) of an adapter-inputs export."""
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        proto = onnx_model
    else:
        p = getattr(onnx_model, "path", onnx_model)
        if not Path(str(p)).is_file():
            raise ExportError(f"{p}: no such ONNX file")
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise ExportError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    for entry in proto.metadata_props:
        if entry.key == META_KEY:
            try:
                layers = json.loads(entry.value)["layers"]
            except (ValueError, RecursionError, KeyError, TypeError) as e:
                raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: corrupted loldu adapter metadata "
                                  f"({type(e).__name__})") from None
            if not isinstance(layers, list) or not all(isinstance(r, dict) for r in layers):
                raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: corrupted loldu adapter metadata")
            return layers
    raise ExportError(f"{getattr(onnx_model, 'path', onnx_model)}: not exported with adapter_inputs=True "
                      "(no loldu adapter metadata)")


def adapter_feeds(source, onnx_model=None, *, adapter_name: Optional[str] = None) -> Dict[str, "torch.Tensor"]:
    """{`loldu.c.<layer>`: c (r,) fp32 CPU tensor} for an export made with adapter_inputs=True.

    source: a model with LoLDU layers (adapter `adapter_name`, default the active one), or an adapter
        directory written by loldu.save_adapter; a directory needs `onnx_model` (the exported file,
        its OrtRunner or ModelProto), whose metadata holds each layer's D and base fingerprint.
    c = sigma0 (z - D) + (sigma - sigma0) z, exactly as the PyTorch layers compute it.
    Raises ExportError if the adapter does not fit the export (other layers, rank or base weights).
    """
    if isinstance(source, nn.Module):
        state = AdapterState.of(source).require_layers("loldu.export.adapter_feeds", ExportError)
        layers = state.layers
        name = adapter_name or state.active
        state.require_exists(name, "loldu.export.adapter_feeds", ExportError)
        feeds = {C_PREFIX + n: layer.coefficients(name).detach().float().cpu() for n, layer in layers}
        if onnx_model is not None:
            from loldu.adapter_io import fingerprint

            meta = {r["layer"]: r for r in adapter_metadata(onnx_model)}
            _check_layers(sorted(n for n, _ in layers), sorted(meta), "the model's adapter")
            for n, layer in layers:
                _check_base(meta[n], n, layer.rank, fingerprint(layer.base_matrix(), layer.loldu_pivots).hex(),
                            layer.loldu_pivots.tolist(), "the model's adapter")
        return feeds
    if onnx_model is None:
        raise ExportError("loldu.export.adapter_feeds: an adapter directory needs onnx_model (the exported file)")
    from loldu.adapter_io import read_adapter
    from loldu.errors import AdapterError

    try:
        header, config, tensors = read_adapter(source)
    except AdapterError as e:
        raise ExportError(str(e)) from None
    meta = {r["layer"]: r for r in adapter_metadata(onnx_model)}
    names = [e["name"] for e in header["layers"]]
    _check_layers(sorted(names), sorted(meta), f"adapter {source}")
    s0 = config.initial_scale
    feeds = {}
    for i, n in enumerate(names):
        rec = meta[n]
        _check_base(rec, n, tensors["z"].shape[1], bytes(tensors["fingerprint"][i].tolist()).hex(),
                    tensors["pivots"][i].tolist(), f"adapter {source}")
        z, s = tensors["z"][i].float(), tensors["sigma"][i].float()
        D = torch.tensor(rec["D"], dtype=torch.float32)
        feeds[rec["input"]] = coefficients_from(z, s, D, s0)
    return feeds


def _check_base(rec: dict, name: str, rank: int, fp_hex: str, pivots: List[int], what: str) -> None:
    """The adapter's layer `name` must have the rank, base-weight fingerprint and pivots the export recorded."""
    if rank != rec["rank"]:
        raise ExportError(f"{what}: rank {rank} but the export's layer '{name}' has rank {rec['rank']}")
    if fp_hex != rec["fingerprint"] or pivots != rec["pivots"]:
        raise ExportError(f"{what}: layer '{name}' was trained on a different base weight than the "
                          "exported model (fingerprint mismatch)")


def _check_layers(have: List[str], want: List[str], what: str) -> None:
    if have != want:
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise ExportError(f"{what} does not match the export's adapter inputs: "
                          f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
