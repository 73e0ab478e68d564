"""Merge-and-export to ONNX: a LoLDU model becomes a plain ONNX graph, or one with `c` as inputs.

Exporter: torch.onnx.export(dynamo=True), i.e. torch.export, then onnxscript (a required package)
builds the ONNX graph. The fused op `loldu::adapter_linear` has an ONNX translation
(onnx_graph.translation_table: MatMuls, a shared c folded into PL as the compiled kernel does), so the graph
runs each adapted layer's own computation, op included, and no custom-op node; the layers know
nothing of the export. Export time on torch 2.13, MiniLM-L6 (rank 8 on 36 linears, example batch
2 x 16 tokens), 2 CPU cores shared with other jobs, CPU seconds, median of 10: merged 4.6 s, c as
inputs 6.2 s, against 2.1 s and 2.4 s with the TorchScript exporter this replaced (about 2.2x and
2.6x slower: tracing to ATen, the decompositions and onnxscript's optimizer each cost about what
the whole TorchScript export did). The first export in a process pays a few seconds more (imports,
and the torchlib registry, built once per process here: onnx_graph.dynamo_export).

Three forms:
- merge=True (default): ΔW is folded into the weights of a copy, which is then a plain model; the
  graph is operator-for-operator the base model's graph.
- merge=False: the adapter's c is a constant; each adapted linear is the op's translation, three
  MatMuls, with PL diag(c) folded into one initializer (onnx_graph's folding rule).
- merge=False, adapter_inputs=True: every adapted layer's c (r,) fp32 is a graph input named
  `loldu.c.<layer name>`, so one file serves every adapter trained on the same base. The file's
  metadata records each layer's D and base-weight fingerprint, so `adapter_feeds` can turn an
  adapter directory into those inputs, refusing an adapter trained on another base.
In both unmerged forms the exporter's copy has each adapted layer wrapped in a _WithC module that
hands the layer the chosen c (computed before any fp16 cast), a constant or a graph input, through
the layer's public `adapted(x, c)`; a "cur" or "lu" layer's copy is re-stored as "full" first
(`use_storage`; an "lu" copy gets W0 = P L D Ũ back, within the LU's rounding, and keeps the recorded
fingerprint of the W0 it was trained on). Merged, an "lu" layer's W(c) is formed from its LU.

Modules: adapter_inputs (names, metadata, feeds) <- ort_runner (OrtRunner) <- onnx_export -> onnx_graph
(the op's translation and the exporter run).
"""
import contextlib
import copy
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from loldu.atomic import atomic_write
from loldu.errors import ExportError
from loldu.model import merge_and_unload, unwrap
from loldu.state import AdapterState

from .adapter_inputs import C_PREFIX, META_KEY, adapter_feeds, add_serving_defaults, metadata_json
from .lu_graph import LuGraph
from .onnx_graph import dynamo_export, quiet_exporter
from .ort_runner import OrtRunner, _short

# torch.onnx's exporter (torchlib) is written against opset 18; a lower opset is converted down.
DEFAULT_OPSET = 18
# Parity bounds, max |ORT - PyTorch| over all outputs, each times max(1, max |y|). fp32: ~800 fp32
# roundings of the largest output (SmolLM2-135M merged, logits up to 35: 1.0e-4; with its full-rank
# packed-LU adapter unmerged, the LU's rounding: 1.6e-3, against a bound of 3.5e-3). fp16 (ORT in fp16
# against the fp32 PyTorch model): about 20 fp16 roundings (MiniLM, 6 layers, merged: 0.04 against 0.12).
FP32_BOUND = 1e-4
FP16_BOUND = 2e-2


def output_path_problem(path: Path) -> Optional[str]:
    """Why an ONNX file cannot be written at `path` (checked before any work), or None."""
    if path.suffix != ".onnx":
        return "must end in .onnx"
    try:
        if path.is_dir():
            return "is a directory"
        if not path.parent.is_dir():
            return f"cannot be written: directory {str(path.parent)!r} " + (
                "is not a directory" if path.parent.exists() else "does not exist")
    except OSError as e:  # a name longer than the file system allows (ENAMETOOLONG), a loop of links
        return f"cannot be written ({type(e).__name__}: {e.strerror or e})"
    return None


def parity_bound(dtype: str, reference: Sequence[torch.Tensor]) -> float:
    """The max abs difference allowed between ORT's and PyTorch's outputs for an export in `dtype`: the
    dtype's bound times max(1, max |reference|). Both runtimes round each sum to the dtype's precision in
    their own order, so the difference grows with the outputs' size (an LLM's logits reach ~35)."""
    peak = max((float(t.detach().abs().max()) for t in reference if t.numel()), default=0.0)
    return (FP32_BOUND if dtype == "fp32" else FP16_BOUND) * max(1.0, peak)


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


def token_inputs(config, batch: int, length: int, seed: int) -> Dict[str, torch.Tensor]:
    """{input_ids, attention_mask} of `batch` rows of `length` token ids drawn (seeded) from a transformers
    config's vocabulary: example inputs for a model directory without a usable tokenizer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ExportError(f"loldu.export: the model's config ({type(config).__name__}) has no vocab_size to draw "
                          "example token ids from")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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


def _call(model: nn.Module, names: List[str], by_kw: bool, inputs: Sequence[torch.Tensor]):
    return model(**dict(zip(names, inputs))) if by_kw else model(*inputs)


class _Graph(nn.Module):
    """What torch.export traces: the model's inputs, then the c inputs (if any), all positional; a
    tuple of tensors out. The c inputs reach the _WithC modules through `slots`, filled for the call."""

    def __init__(self, model: nn.Module, names: List[str], by_kw: bool, slots: List[torch.Tensor]):
        super().__init__()
        self.model = model
        self.names, self.by_kw = names, by_kw
        self.slots = slots  # a plain list shared with the _WithC modules

    def forward(self, *args):
        n = len(self.names)
        self.slots[:] = args[n:]
        try:
            out = _call(self.model, self.names, self.by_kw, args[:n])
        finally:
            self.slots.clear()
        return tuple(_flatten_outputs(out)[1])


class _WithC(nn.Module):
    """Stands in for an adapted layer in the exporter's copy: the layer's own computation (the
    loldu op for linears) with the c the export chose, a constant or graph input slots[index]."""

    def __init__(self, layer: nn.Module, c: Optional[torch.Tensor] = None, slots: Optional[list] = None,
                 index: int = 0):
        super().__init__()
        self.layer = layer
        self.slots, self.index = slots, index
        if c is not None:
            self.register_buffer("c", c, persistent=False)

    def forward(self, x):
        return self.layer.adapted(x, self.c if self.slots is None else self.slots[self.index])


def _wrap_layers(work: nn.Module, layers, cs, adapter_inputs: bool, slots: list, lu_graph: bool = False) -> None:
    """Puts a _WithC (with lu_graph, a LuGraph) in place of every adapted layer that exports an adapter (c not None)."""
    root = unwrap(work)
    for i, ((name, layer), c) in enumerate(zip(layers, cs)):
        if c is None:
            continue
        parent, _, attr = name.rpartition(".")
        if lu_graph:
            stand_in = LuGraph(name, layer, c=None if adapter_inputs else c, slots=slots if adapter_inputs else None,
                               index=i)
        else:
            stand_in = _WithC(layer, slots=slots, index=i) if adapter_inputs else _WithC(layer, c=c)
        setattr(root.get_submodule(parent), attr, stand_in)


def _axes(name: str, axes) -> Dict[int, str]:
    """{axis: label} from torch.onnx's {axis: label} or [axis, ...] form."""
    if isinstance(axes, Mapping):
        return {int(a): str(label) for a, label in axes.items()}
    return {int(a): f"{name}_dim{a}" for a in axes}


def _default_dynamic_axes(in_names, inputs) -> Dict[str, Dict[int, str]]:
    """Axis 0 of every input is 'batch'; axis 1 of integer inputs of rank >= 2 (token ids, masks) is
    'sequence'. Output axes are dynamic where the graph derives them from these."""
    axes: Dict[str, Dict[int, str]] = {}
    for name, t in zip(in_names, inputs):
        if t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if t.dim() >= 2 and not t.is_floating_point():
            axes[name][1] = "sequence"
    return axes


def _dynamic_shapes(in_names, inputs, dynamic_axes):
    """torch.export's dynamic_shapes for _Graph(*inputs), from {input name: {axis: label}}."""
    specs = []
    for name, t in zip(in_names, inputs):
        axes = _axes(name, dynamic_axes.get(name, {}))
        small = [a for a in axes if a < t.dim() and t.shape[a] < 2]
        if small:
            raise ExportError(f"loldu.export: example input {name!r} has size {t.shape[small[0]]} on dynamic axis "
                              f"{small[0]}; torch.export fixes sizes 0 and 1, so trace with at least 2 there "
                              "(or pass dynamic_axes={} for a static graph)")
        specs.append(axes or None)
    return (tuple(specs),) if any(specs) else None


def _label_output_axes(proto, dynamic_axes, notes: List[str]) -> None:
    """The dynamic_axes labels given for outputs, on the output axes the graph made dynamic."""
    outputs = {o.name: o for o in proto.graph.output}
    for name, axes in dynamic_axes.items():
        if name not in outputs:
            continue
        dims = outputs[name].type.tensor_type.shape.dim
        for axis, label in _axes(name, axes).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = label
            else:
                notes.append(f"output {name!r} axis {axis} is static in the exported graph")


# -- the export ------------------------------------------------------------------------------------
def _prepare(model: nn.Module, merge: bool, adapter_inputs: bool, adapter_name: Optional[str], dtype: str):
    """A private, eval-mode copy ready to export, and (merged adapter name, adapted layers, the c each
    layer exports (None: its own forward, no adapter), notes, adapter-inputs metadata)."""
    work = copy.deepcopy(model)
    work.eval()
    config = getattr(unwrap(work), "config", None)
    if getattr(config, "use_cache", None):  # a causal LM's logits graph: no KV cache traced (a Cache is no tensor output)
        config.use_cache = False
    state = AdapterState.of(work)
    layers = state.layers
    merged, notes = None, []
    if layers:
        if adapter_name is not None:
            state.require_exists(adapter_name, "loldu.export", ExportError)
        already = state.merged
        if state.saved:
            if adapter_inputs:
                raise ExportError(f"loldu.export: adapter_inputs=True cannot serve other adapters of this model: its "
                                  f"saved module '{state.saved[0][0]}' (modules_to_save, a task head) is trained per "
                                  "adapter and would be baked into the graph; export each adapter merged instead")
            chosen = adapter_name or already or state.active
            if chosen is not None and chosen != state.active and already is None:
                state.set_active(chosen, trainable=False)  # this private copy's heads: the exported adapter's
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
            if not adapter_inputs and adapter_name is None and state.active is None:
                notes.append("no active adapter: exported the base model's computation")
    elif adapter_inputs:
        raise ExportError("loldu.export: adapter_inputs=True needs a model with LoLDU layers (loldu.inject or "
                          "loldu.load_adapter first)")
    for _, layer in layers:  # the copy's "cur" and "lu" layers keep PL and U: ONNX has no triangular solve
        layer.use_storage("full")
    # Recorded before any fp16 cast: D and the fingerprints are those of the trained-on base.
    meta = metadata_json(layers) if adapter_inputs else None
    # So is c (loldu.layer.coefficients_from): in fp16, the paper's z - D loses most of its digits
    # for a small change (c off by 15%).
    cs = [_exported_c(layer, adapter_name, adapter_inputs) for _, layer in layers]
    if dtype == "fp16":
        work.half()
    return work, merged, layers, cs, notes, meta


def _exported_c(layer: nn.Module, adapter_name: Optional[str], adapter_inputs: bool) -> Optional[torch.Tensor]:
    """The c an unmerged export gives `layer`: adapter `adapter_name`'s (default: the active one), in
    its working dtype; with adapter_inputs, the fp32 example value of its c input (zeros if no adapter)."""
    name = adapter_name or layer.active_adapter
    if name is None:
        return torch.zeros(layer.rank, device=layer.loldu_D.device) if adapter_inputs else None
    c = layer.coefficients(name).detach().clone()
    return c.float() if adapter_inputs else c


def to_onnx(model: nn.Module, example_inputs, path, *, merge: bool = True, dtype: Optional[str] = None,
            dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None, adapter_inputs: bool = False,
            adapter_name: Optional[str] = None, input_names: Optional[List[str]] = None,
            output_names: Optional[List[str]] = None, opset: int = DEFAULT_OPSET, check_inputs=None,
            provider: str = "auto", lu_graph: bool = False) -> ExportReport:
    """Exports `model` to the ONNX file `path` and returns an ExportReport; `model` is not changed.

    example_inputs: a tensor, a tuple of tensors (positional) or a dict name -> tensor (keyword, e.g.
        a tokenizer's output); floating inputs are cast to fp16 when dtype="fp16".
    merge: fold adapter `adapter_name` (default: the active one) into the weights of a copy: the
        graph then holds exactly the base model's operators. merge=False keeps the adapter as extra
        MatMuls with c baked in, or with adapter_inputs=True as graph inputs `loldu.c.<layer>` (r,) fp32.
    dtype: "fp32" or "fp16" (weights and float inputs/outputs in fp16; c inputs stay fp32); None: the
        model's own (fp16 for an fp16 model). A bf16 model, or an fp16 model asked for "fp32", is refused.
    lu_graph: with merge=False, every adapted layer (full rank, Linear-like) runs as two MatMuls
        against its triangular factors with D + c between them and no W0 (export/lu_graph.py).
    dynamic_axes: torch.onnx's {name: {axis: label}}; default: axis 0 of every input is "batch" and
        axis 1 of integer inputs of rank >= 2 is "sequence" (and the matching output axes). {} = static.
    check_inputs: fresh inputs like example_inputs; if given, the file is run in ONNX Runtime on them
        and compared with the PyTorch model (the caller's, unmerged: the true reference); above the
        bound (parity_bound) it is an ExportError and no file is written.
    The file is written to a temporary file in the same directory, checked with onnx.checker, then
    renamed: a failure or a kill never leaves a partial `path` behind, and the temporaries that killed
    exports left next to `path` are removed first (loldu.atomic.clean_stale_temps). Raises
    ExportError, also for file-system failures (naming `path`).
    """
    import onnx

    if lu_graph and merge:
        raise ExportError("loldu.export: lu_graph=True needs merge=False (merged, the graph holds W(c) itself)")
    dtype = _export_dtype(model, dtype)
    path, names, inputs, by_kw, names_out = _checked_request(model, example_inputs, path, dtype, merge,
                                                             adapter_inputs, input_names)
    t0 = time.perf_counter()
    work, merged, layers, cs, notes, meta = _prepare(model, merge, adapter_inputs, adapter_name, dtype)
    if dtype == "fp16":
        inputs = [t.half() if t.is_floating_point() else t for t in inputs]
    out_names = _output_names(work, names, by_kw, inputs, output_names)
    c_layers = layers if adapter_inputs else []
    c_names = [C_PREFIX + n for n, _ in c_layers]
    if dynamic_axes is None:
        dynamic_axes = _default_dynamic_axes(names_out, inputs)
    proto = _traced(work, layers, cs, adapter_inputs, names, by_kw, inputs, names_out + c_names, out_names,
                    dynamic_axes, opset, lu_graph and not merge)
    _label_output_axes(proto, dynamic_axes, notes)
    if c_layers:
        _record_adapter_inputs(proto, meta, c_names)
    with _os_errors_named(path), atomic_write([path]) as w:
        tmp = w.temps[0]
        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:
            raise ExportError(f"loldu.export: onnx.checker rejected the exported graph ({_short(e)})") from None
        graph_inputs = [i.name for i in proto.graph.input]
        report = ExportReport(path=str(path), bytes=os.path.getsize(tmp), dtype=dtype, opset=opset, merged=merged,
                              input_names=graph_inputs, output_names=out_names, adapter_inputs=c_names,
                              op_counts=op_counts(proto), export_seconds=time.perf_counter() - t0, notes=notes)
        if check_inputs is not None:
            _parity(report, tmp, model, check_inputs, c_layers, adapter_name, provider, names, names_out)
    return report


def _export_dtype(model, dtype: Optional[str]) -> str:
    """The export's dtype: `dtype`, or the model's own ("fp16" for an fp16 model, else "fp32"). The graph
    keeps the weights' dtype, so an fp16 model exported as "fp32" would be an fp16 graph checked against the
    fp32 bound; bf16 has no ONNX Runtime CPU kernels (Gemm): both refused, saying what to pass."""
    if dtype is not None and dtype not in ("fp32", "fp16"):
        raise ExportError(f"loldu.export: dtype must be 'fp32' or 'fp16', got {dtype!r}")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()} if isinstance(model, nn.Module) else set()
    if torch.bfloat16 in floats:
        raise ExportError("loldu.export: the model has bf16 weights, which ONNX Runtime cannot run on CPU (no bf16 "
                          "Gemm/MatMul kernels); export model.float() (dtype='fp32') or model.half() (dtype='fp16')")
    if dtype == "fp32" and torch.float16 in floats:
        raise ExportError("loldu.export: the model has fp16 weights; pass dtype='fp16' (or export model.float())")
    return dtype or ("fp16" if torch.float16 in floats else "fp32")


def _checked_request(model, example_inputs, path, dtype: str, merge: bool, adapter_inputs: bool,
                     input_names: Optional[List[str]]):
    """to_onnx's arguments checked before any work: (path, input names, inputs, by keyword, the
    graph's input names)."""
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"loldu.export: dtype must be 'fp32' or 'fp16', got {dtype!r}")
    if adapter_inputs and merge:
        raise ExportError("loldu.export: adapter_inputs=True needs merge=False (a merged adapter is no input)")
    if not isinstance(model, nn.Module):
        raise ExportError(f"loldu.export: model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    problem = output_path_problem(path)
    if problem:
        raise ExportError(f"loldu.export: output path {str(path)!r} {problem}")
    names, inputs, by_kw = _normalize_inputs(example_inputs)
    if input_names is None:
        return path, names, inputs, by_kw, names
    if len(input_names) != len(inputs):
        raise ExportError(f"loldu.export: {len(input_names)} input_names for {len(inputs)} example inputs")
    return path, names, inputs, by_kw, list(input_names)


def _output_names(work: nn.Module, names: List[str], by_kw: bool, inputs, output_names) -> List[str]:
    """The graph's output names: `output_names`, or those of the outputs of one call of the copy."""
    with torch.no_grad():  # before any layer is wrapped: this also settles the model's one-time call check
        try:
            names_seen, sample = _flatten_outputs(_call(work, names, by_kw, inputs))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"loldu.export: the model failed on example_inputs ({type(e).__name__}: {e})") from None
    out_names = list(output_names) if output_names is not None else names_seen
    if len(out_names) != len(sample):
        raise ExportError(f"loldu.export: {len(out_names)} output_names for {len(sample)} outputs")
    return out_names


def _traced(work: nn.Module, layers, cs, adapter_inputs: bool, names: List[str], by_kw: bool, inputs,
            all_in: List[str], out_names: List[str], dynamic_axes, opset: int, lu_graph: bool = False):
    """The ONNX ModelProto of the copy `work`, its adapted layers wrapped to take the chosen c (the
    c inputs, after the model's, when adapter_inputs)."""
    unknown = set(dynamic_axes) - set(all_in) - set(out_names)
    if unknown:
        raise ExportError(f"loldu.export: dynamic_axes names {sorted(unknown)} are neither inputs {all_in} "
                          f"nor outputs {out_names}")
    args = list(inputs) + [c for c in cs if adapter_inputs]
    dynamic_shapes = _dynamic_shapes(all_in, args, dynamic_axes)
    slots: List[torch.Tensor] = []
    _wrap_layers(work, layers, cs, adapter_inputs, slots, lu_graph)
    graph = _Graph(unwrap(work), names, by_kw, slots).eval()
    with torch.no_grad(), quiet_exporter():
        try:
            return dynamo_export(graph, args, all_in, out_names, dynamic_shapes, opset)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"loldu.export: torch.onnx.export failed ({_short(e.__cause__ or e)})") from None


def _record_adapter_inputs(proto, meta: str, c_names: List[str]) -> None:
    """The adapter-inputs metadata written into the graph, whose every c input must be used."""
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    add_serving_defaults(proto, c_names)
    used = {i for node in proto.graph.node for i in node.input}
    unused = [n for n in c_names if n not in used]
    if unused:
        raise ExportError(f"loldu.export: adapter inputs {unused[:3]} are not used by the graph "
                          "(the forward does not call those layers?)")


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
                out = _call(model, names, by_kw, tensors)
    finally:
        model.train(was_training)
    return [t.float() for t in _flatten_outputs(out)[1]]


def _parity(report: ExportReport, onnx_path: str, model: nn.Module, check_inputs, c_layers, adapter_name, provider,
            example_names: List[str], export_names: List[str]):
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
    for (name, o), r in zip(outs.items(), ref):
        if tuple(o.shape) != tuple(r.shape):
            raise ExportError(f"loldu.export: output {name!r} has shape {tuple(o.shape)} in ONNX Runtime but "
                              f"{tuple(r.shape)} in PyTorch for the check inputs: the exported graph fixed a size "
                              f"the example inputs had (mark it dynamic, or check with inputs of the same shape); "
                              f"{report.path} not written")
    diff = max(float((torch.as_tensor(o).float() - r).abs().max()) if r.numel() else 0.0
               for o, r in zip(outs.values(), ref))
    report.max_abs_diff, report.parity_bound, report.provider = diff, parity_bound(report.dtype, ref), runner.provider
    if not diff <= report.parity_bound:  # NaN fails too
        raise ExportError(f"loldu.export: parity check failed: max |ORT - PyTorch| = {diff:.3g} exceeds the "
                          f"{report.dtype} bound {report.parity_bound:.3g}; {report.path} not written")
