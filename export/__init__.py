"""loldu.export: merge-and-export LoLDU models to ONNX and run them in ONNX Runtime.

    report = loldu.export.to_onnx(model, example_inputs, "model.onnx")   # ΔW merged: a plain graph
    outputs = loldu.export.OrtRunner("model.onnx").run(feeds)            # CUDA when it can, else CPU

With merge=False, adapter_inputs=True, every adapted layer's c is a graph input `loldu.c.<layer>` with
a default of zeros (the base model), so one file serves every adapter of the same base, switched per
run by ONNX Runtime's adapter API:

    loldu.export.to_ort_adapter("adapter_dir", "model.onnx", "a.onnx_adapter")    # c per layer, ~ r numbers each
    runner = loldu.export.OrtRunner("model.onnx")
    runner.run(feeds, adapter="a.onnx_adapter")   # or adapter="adapter_dir"; loaded once, then cached

lu_graph=True (full-rank adapters) exports each adapted linear as two MatMuls against its triangular
factors with D + c between them, and no W0 (export/lu_graph.py). A causal LM exports its logits graph
(input_ids, attention_mask -> logits; token_inputs draws example ids from the config's vocabulary, no
tokenizer needed); to_onnx_with_cache exports one decoding step with the KV cache as inputs and outputs.
Needs the `onnx`, `onnxscript` (the torch.export-based exporter) and `onnxruntime-gpu` (or
`onnxruntime`) packages; they are imported lazily.
"""
from .adapter_inputs import C_PREFIX, adapter_feeds, adapter_metadata
from .causal_lm import to_onnx_with_cache
from .onnx_export import FP16_BOUND, FP32_BOUND, ExportReport, op_counts, parity_bound, pytorch_outputs, to_onnx, token_inputs
from .ort_adapter import OrtAdapterReport, to_ort_adapter
from .ort_runner import OrtNotice, OrtRunner

__all__ = [
    "C_PREFIX", "FP16_BOUND", "FP32_BOUND", "ExportReport", "OrtAdapterReport", "OrtNotice", "OrtRunner",
    "adapter_feeds", "adapter_metadata", "op_counts", "parity_bound", "pytorch_outputs", "to_onnx", "to_onnx_with_cache",
    "to_ort_adapter", "token_inputs",
]
