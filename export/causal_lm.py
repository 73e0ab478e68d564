"""A causal LM's decoding step with its KV cache as plain tensors, for ONNX: `to_onnx_with_cache`.

The logits graph (loldu.export.to_onnx of input_ids and attention_mask) recomputes the whole sequence at
every generated token. The step graph here takes the cache as inputs and returns it grown:

    input_ids (batch, sequence), attention_mask (batch, past + sequence),
    past_key.<i>, past_value.<i> (batch, kv heads, past, head dim) for every layer i
      -> logits (batch, sequence, vocab), present_key.<i>, present_value.<i> (batch, kv heads, past + sequence, head dim)

The first step feeds the prompt with a cache of length 0, each later step one token and the presents of
the step before. Every axis but the heads is dynamic. The graph is the one to_onnx exports (merged, or
with c baked in or as inputs), traced through a wrapper that builds a transformers DynamicCache from the
tensors, so any decoder whose forward takes that cache exports this way (tested: Llama, GPT-2).
"""
import inspect
from typing import Dict, List

import torch
import torch.nn as nn

from loldu.errors import ExportError
from loldu.model import unwrap


def _shape(config) -> tuple:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
        kv = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    except (AttributeError, TypeError) as e:
        raise ExportError(f"loldu.export: cannot read the KV cache's shape from {type(config).__name__} ({e})") from None
    return layers, kv, head_dim


def cache_names(layers: int, prefix: str = "past") -> List[str]:
    """past_key.0, past_value.0, past_key.1, ... (prefix "present" for the outputs)."""
    return [f"{prefix}_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


class CachedStep(nn.Module):
    """model(input_ids, attention_mask, cache) with the cache as flat tensors in and out (cache_names)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = unwrap(model).config
        self.layers = _shape(self.config)[0]
        params = inspect.signature(type(unwrap(model)).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, **past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        names = cache_names(self.layers)
        for i in range(self.layers):
            cache.update(past[names[2 * i]], past[names[2 * i + 1]], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{self.cache_arg: cache})
        grown = out.past_key_values
        flat = [t for i in range(self.layers) for t in (grown.layers[i].keys, grown.layers[i].values)]
        return {"logits": out.logits, **dict(zip(cache_names(self.layers, "present"), flat))}


def step_inputs(model: nn.Module, batch: int, past: int, length: int, seed: int) -> Dict[str, torch.Tensor]:
    """Seeded example inputs of the step graph: `length` new token ids after a cache of `past` positions."""
    config = unwrap(model).config
    layers, kv, head_dim = _shape(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    g = torch.Generator().manual_seed(seed)
    dtype = next(unwrap(model).parameters()).dtype
    feeds = {"input_ids": torch.randint(0, int(text.vocab_size), (batch, length), generator=g),
             "attention_mask": torch.ones(batch, past + length, dtype=torch.long)}
    for name in cache_names(layers):
        feeds[name] = torch.randn(batch, kv, past, head_dim, generator=g).to(dtype)
    return feeds


def step_axes(layers: int) -> Dict[str, Dict[int, str]]:
    """The step graph's dynamic axes: batch, sequence (new tokens), past and total (past + sequence)."""
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past"} for n in cache_names(layers)})
    axes.update({n: {0: "batch", 2: "total"} for n in cache_names(layers, "present")})
    return axes


def to_onnx_with_cache(model: nn.Module, path, *, check: bool = True, **kwargs):
    """Exports the decoding step of the causal LM `model` (a transformers model whose forward takes a
    DynamicCache, with or without LoLDU layers) to `path` with its KV cache as inputs and outputs (see
    the module's docstring); other keyword arguments are loldu.export.to_onnx's (merge, dtype,
    adapter_inputs, ...). check: ONNX Runtime parity on fresh inputs of other sizes. Returns the report."""
    from .onnx_export import to_onnx

    if not hasattr(unwrap(model), "config"):
        raise ExportError(f"loldu.export: to_onnx_with_cache needs a transformers causal LM, got {type(model).__name__}")
    step = CachedStep(model)
    example = step_inputs(model, batch=2, past=3, length=2, seed=0)  # size >= 2 on every dynamic axis
    fresh = step_inputs(model, batch=3, past=4, length=1, seed=1) if check else None
    return to_onnx(step, example, path, dynamic_axes=step_axes(step.layers), check_inputs=fresh, **kwargs)
