"""The fused LoLDU linear op (LOLDU.md, facts 3 and 4) and its Python registrations.

torch.ops.loldu.adapter_linear has one schema and CPU/CUDA kernels in C++ (cpp/ops.cpp); this
file attaches the autograd formula and the fake (meta) implementation, so the op runs under
torch.compile(fullgraph=True) and passes torch.library.opcheck.
"""
from typing import Optional

import torch

from . import _backend
from .errors import ShapeError
from .reference import adapter_linear_reference, delta_weight_reference


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device: False where autocast does not exist (e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _check(x, weight, bias, PL, U, c):
    def shapes():  # only formatted when a check fails: this runs on every forward
        return (f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, PL {tuple(PL.shape)}, "
                f"U {tuple(U.shape)}, c {tuple(c.shape)}")

    if weight.dim() != 2 or PL.dim() != 2 or U.dim() != 2 or x.dim() < 1:
        raise ShapeError(f"loldu.adapter_linear: expected x (..., k), weight (d, k), PL (d, r), U (r, k); got {shapes()}")
    d, k = weight.shape
    r = PL.shape[1]
    if x.shape[-1] != k:
        raise ShapeError(f"loldu.adapter_linear: x has {x.shape[-1]} features but weight expects k={k}; got {shapes()}")
    if PL.shape[0] != d or tuple(U.shape) != (r, k) or r < 1:
        raise ShapeError(f"loldu.adapter_linear: inconsistent rank or shapes, expected PL ({d}, r), U (r, {k}); got {shapes()}")
    if tuple(c.shape) != (r,) and tuple(c.shape) != (*x.shape[:-1], r):
        raise ShapeError(f"loldu.adapter_linear: c must be (r,) = ({r},) or x's leading shape + (r,); got {shapes()}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ShapeError(f"loldu.adapter_linear: bias must be ({d},), got {tuple(bias.shape)}")
    tensors = [weight, PL, U, c] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ShapeError(f"loldu.adapter_linear: mixed devices {[str(t.device) for t in [x] + tensors]}; shapes: {shapes()}")
    if x.dtype not in _DTYPES:
        raise ShapeError(f"loldu.adapter_linear: x must be float64, float32, float16 or bfloat16, got {x.dtype}; "
                         f"shapes: {shapes()}")
    if bias is not None and bias.dtype != x.dtype:
        raise ShapeError(f"loldu.adapter_linear: bias is {bias.dtype} but x is {x.dtype}; shapes: {shapes()}")
    if any(t.dtype != x.dtype for t in [weight, PL, U]):
        raise ShapeError(
            f"loldu.adapter_linear: x is {x.dtype} but weight/PL/U are {weight.dtype}/{PL.dtype}/{U.dtype} "
            f"(cast them, or use torch.autocast); shapes: {shapes()}")
    if c.dtype not in (x.dtype, torch.float32):
        raise ShapeError(f"loldu.adapter_linear: c must be {x.dtype} or float32, got {c.dtype}")


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], PL: torch.Tensor,
                   U: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y = x W0^T + b + ((x U^T) * c) PL^T, never forming ΔW.

    x (..., k); weight (d, k); bias (d,) or None; PL (d, r); U (r, k); c (r,) or (..., r) per row.
    Gradients flow to x and c; weight, bias, PL and U are treated as frozen. Returns (..., d).
    """
    autocast = autocast_enabled(x.device.type)
    if not autocast:
        _check(x, weight, bias, PL, U, c)
    if _backend.HAS_OPS:
        return torch.ops.loldu.adapter_linear(x, weight, bias, PL, U, c)
    if autocast:
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, PL, U = (t.to(dt) for t in (x, weight, PL, U))
        bias = bias.to(dt) if bias is not None else None
        c = c.float()
    return adapter_linear_reference(x, weight.detach(), None if bias is None else bias.detach(),
                                    PL.detach(), U.detach(), c)


def delta_weight(PL: torch.Tensor, U: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """ΔW = PL diag(c) U, (d, k), in fp32 (fp64 for fp64 factors). Used by merge."""
    if _backend.HAS_OPS:
        return torch.ops.loldu.delta_weight(PL, U, c)
    return delta_weight_reference(PL, U, c)


if _backend.HAS_OPS:

    @torch.library.register_fake("loldu::adapter_linear")
    def _adapter_linear_fake(x, weight, bias, PL, U, c):
        _check(x, weight, bias, PL, U, c)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("loldu::adapter_linear_backward")
    def _adapter_linear_backward_fake(grad_y, x, weight, PL, U, c, need_grad_x):
        gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
        return gx, c.new_empty(c.shape)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, PL, U, c = inputs
        ctx.save_for_backward(x, weight, PL, U, c)

    def _backward(ctx, grad):
        x, weight, PL, U, c = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        if not (need_x or need_c):
            return None, None, None, None, None, None
        gx, gc = torch.ops.loldu.adapter_linear_backward(grad, x, weight, PL, U, c, need_x)
        return (gx if need_x else None), None, None, None, None, (gc if need_c else None)

    torch.library.register_autograd("loldu::adapter_linear", _backward, setup_context=_setup_context)
