"""loldu.export: merge-and-export LoLDU models to ONNX and run them in ONNX Runtime.

    report = loldu.export.to_onnx(model, example_inputs, "model.onnx")   # ΔW merged: a plain graph
    outputs = loldu.export.OrtRunner("model.onnx").run(feeds)            # CUDA when it can, else CPU

With merge=False, adapter_inputs=True, every adapted layer's c is a graph input, so one file serves
every adapter of the same base: feed loldu.export.adapter_feeds(adapter_dir, "model.onnx").
Needs the `onnx`, `onnxscript` (the torch.export-based exporter) and `onnxruntime-gpu` (or
`onnxruntime`) packages; they are imported lazily.
"""
from .adapter_inputs import C_PREFIX, adapter_feeds, adapter_metadata
from .onnx_export import FP16_BOUND, FP32_BOUND, ExportReport, op_counts, parity_bound, pytorch_outputs, to_onnx
from .ort_runner import OrtNotice, OrtRunner

__all__ = [
    "C_PREFIX", "FP16_BOUND", "FP32_BOUND", "ExportReport", "OrtNotice", "OrtRunner", "adapter_feeds",
    "adapter_metadata", "op_counts", "parity_bound", "pytorch_outputs", "to_onnx",
]
