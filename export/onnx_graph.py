"""The ONNX graph of a traced module: loldu::adapter_linear's ONNX translation, and the torch.onnx
exporter (torch.export, then onnxscript) run with it and with loldu's folding rule.

Used by onnx_export; imports no other module of loldu.export.
"""
import contextlib
import functools
import logging
import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from loldu.errors import ExportError


@functools.lru_cache(maxsize=None)
def translation_table() -> dict:
    """{loldu::adapter_linear: its ONNX translation}. The op stays one node through torch.export on both
    backends (the reference one is CompositeImplicitAutograd, which the exporter keeps whole because
    the registry translates it), so both export the same graph."""
    try:
        from onnxscript import opset18 as op
    except ImportError as e:
        raise ExportError(f"loldu.export: torch.onnx.export(dynamo=True) needs onnxscript ({e}); "
                          "pip install onnxscript") from None

    def loldu_adapter_linear(x, weight, bias, PL, U, c, form: str = "auto"):
        """y = x W0^T + b + ((x U^T) * c) PL^T, the low-rank form whatever `form` (how PyTorch evaluates
        the same product). A shared c (r,) is folded into PL as the compiled kernel does it (d r
        multiplies; a constant c folds into one initializer); a per-row c scales x U^T instead."""
        y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        if bias is not None:
            y = op.Add(y, bias)
        t = op.MatMul(x, op.Transpose(U, perm=[1, 0]))
        if c.shape is not None and len(c.shape) == 1:
            low = op.MatMul(t, op.Transpose(op.Mul(PL, op.CastLike(c, PL)), perm=[1, 0]))
        else:
            low = op.MatMul(op.Mul(t, op.CastLike(c, t)), op.Transpose(PL, perm=[1, 0]))
        return op.Add(y, low)

    return {torch.ops.loldu.adapter_linear.default: loldu_adapter_linear}


_REGISTRIES: Dict[int, object] = {}  # opset -> torch.onnx's ONNXRegistry with loldu's translations


def dynamo_export(graph: nn.Module, args, input_names, output_names, dynamic_shapes, opset: int):
    """torch.onnx.export(graph, args, dynamo=True, custom_translation_table=loldu's, ...) as one
    ModelProto (no external data), optimized as torch.onnx optimizes it but see _fold_in_place.

    torch.onnx.export rebuilds its torchlib registry on every call, about 0.6 s here (onnxscript
    re-parses the source of ~500 functions). The registry is built once per opset instead and handed
    to the exporter's own entry point, as torch.onnx.export does; the public call where those
    internals are missing.
    """
    table = translation_table()
    try:
        from torch.onnx._internal.exporter import _core, _dynamic_shapes, _registration
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    except ImportError:  # pragma: no cover - another torch: the public API, same result
        program = torch.onnx.export(graph, tuple(args), dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                    custom_translation_table=table, external_data=False, optimize=False,
                                    verbose=False)
    else:
        key = max(opset, TORCHLIB_OPSET)  # below torchlib's opset: exported at its opset, then converted down
        registry = _REGISTRIES.get(key)
        if registry is None:
            registry = _registration.ONNXRegistry.from_torchlib(opset_version=key)
            for target, fn in table.items():
                registry.register_op(target, fn)
            _REGISTRIES[key] = registry
        shapes, named_axes = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
        program = _core.export(graph, tuple(args), registry=registry, dynamic_shapes=shapes, input_names=input_names,
                               output_names=output_names, verbose=False, optimize=False, opset_version=opset)
        if named_axes:
            program._rename_dynamic_axes(dynamic_shapes)
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(program.model, should_fold=_fold_in_place)  # what optimize=True runs,
    onnxscript.rewriter.onnx_fusions.fuse(program.model)  # with the folding rule below
    return program.model_proto


def _fold_in_place(node) -> Optional[bool]:
    """The optimizer's folding rule, extended: an elementwise Mul/Cast/CastLike of constants whose
    result is no larger than its largest input, a large input (above the optimizer's size limit,
    8192 elements) being used by that node alone, is folded. That is PL diag(c) with a baked c on
    layers with d r > 8192, which the limit would leave to run time; the file does not grow."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Cast", "CastLike"):
        return None
    values = [v for v in node.inputs if v is not None]
    if not values or any(v.const_value is None for v in values):
        return None
    shapes = [tuple(v.const_value.shape) for v in values]
    sizes = [v.const_value.size for v in values]
    try:
        out = int(np.prod(np.broadcast_shapes(*shapes)))
    except ValueError:
        return None
    if out > max(sizes) or any(size > 8192 and len(v.consumers()) > 1 for v, size in zip(values, sizes)):
        return None
    return True


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's log lines (skipped torchvision ops, shape notes) and warnings stay out of the
    caller's output; its failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx",
                                               "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
