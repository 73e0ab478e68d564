"""The loldu ops: `torch.ops.loldu.{ldu, ldu_from_pivots, adapter_linear, adapter_linear_forward,
adapter_linear_backward, delta_weight}`, their fake (meta) kernels and autograd formula, and the
Python functions users call.

Each op has one schema. Its kernels are the compiled ones (cpp/ops.cpp: CPU, CUDA and autocast)
or, where no extension could be built, the pure-PyTorch reference registered under the same schema
(reference.define_ops). Either way every caller goes through `torch.ops.loldu.*`, so the argument
checks live in the ops' implementations; the functions below only turn the ops' ValueErrors into
loldu's error types. The method (facts used here: docs/method.md): y = x W0^T + b + ((x U^T) c) PL^T.

adapter_linear is a composite of adapter_linear_forward, which returns (y, saved) for a resolved form
("delta" or "dense", §7) and carries the autograd formula: saved (t = x U^T, or the dense W) goes to
the backward instead of being recomputed there. `with forced_form("delta"|"dense"):` (or, for the
whole process, LOLDU_ADAPTER_FORM=delta|dense) makes form="auto" in loldu.ops.adapter_linear run that
form instead of the cost model's choice; an explicit form="delta" or "dense" (a LoLDU layer passes its
adapter config's `form`) is never overridden. So the precedence is: the config's explicit form, then
forced_form / LOLDU_ADAPTER_FORM, then the cost model.
"""
import contextlib
import os
from typing import NamedTuple, Optional

import torch

from . import _backend
from .errors import FactorizationError, LolduError, ShapeError
from .reference import FORMS, autocast_enabled, check_adapter_args, choose_form, dense_min_rows, working_dtype

__all__ = ["LDUResult", "LUPacked", "adapter_linear", "autocast_enabled", "choose_form", "delta_weight",
           "dense_min_rows", "forced_form", "ldu", "ldu_from_pivots", "lu_linear", "lu_packed", "working_dtype"]

# What form="auto" runs: "auto" (the cost model), or the form forced_form or LOLDU_ADAPTER_FORM asks for.
# A plain module attribute rather than a context variable: torch.compile traces through reading it.
_forced = os.environ.get("LOLDU_ADAPTER_FORM", "auto")


@contextlib.contextmanager
def forced_form(form: str):
    """Within the block, form="auto" in adapter_linear runs `form` ("delta" or "dense"; "auto": the cost
    model's choice again) instead of the cost model's choice: for benchmarks and debugging. An explicit
    form="delta"/"dense" (a LoLDU layer's config) is never replaced. It holds for the whole process (every
    thread) while the block runs; the previous setting (LOLDU_ADAPTER_FORM's by default) comes back on exit.
    """
    global _forced
    if not isinstance(form, str) or form not in FORMS:
        raise ShapeError(f"loldu.ops.forced_form: form must be 'auto', 'delta' or 'dense', got {form!r}")
    previous, _forced = _forced, form
    try:
        yield
    finally:
        _forced = previous


class LDUResult(NamedTuple):
    """PL (..., d, r) in W's row order; D (..., r); U (..., r, k) unit upper; pivots (..., r) int64.

    Factors are fp64 for fp64 W and fp32 otherwise (fp16/bf16 are factorized in fp32).
    """

    PL: torch.Tensor
    D: torch.Tensor
    U: torch.Tensor
    pivots: torch.Tensor


class LUPacked(NamedTuple):
    """The full-rank factorization W[perm] = L U in LAPACK's packed layout (docs/method.md).

    LU (..., d, k): L (unit lower, (d, m), m = min(d, k)) strictly below the diagonal, U = diag(D) Ũ on
    and above it; perm (..., d) int64: row i of L U is row perm[i] of W; D (..., m) = diag(U). All in the
    working dtype (fp64 for fp64 W, else fp32).
    """

    LU: torch.Tensor
    perm: torch.Tensor
    D: torch.Tensor


def _op_error(e: Exception, kind) -> LolduError:
    """The loldu error for an op's ValueError (the compiled checks raise ValueError, the reference's
    raise loldu errors already), without the C++ source location torch appends."""
    if isinstance(e, LolduError):
        return e
    return kind(str(e).split("\nException raised from")[0])


def _check_routable(W: torch.Tensor, what: str) -> None:
    """Quantized and sparse tensors never reach the ops' kernels (the dispatcher has none for them)."""
    if W.is_quantized or W.layout != torch.strided:
        raise FactorizationError(f"{what}: W must be fp64, fp32, fp16 or bf16 (dense), got {W.dtype} "
                                 f"({W.layout}) of shape {list(W.shape)}")


def ldu(W: torch.Tensor, rank: int, *, pivoting: str = "partial") -> LDUResult:
    """Leading-`rank` components of W = P L D U, reading only W[:, :rank] and the pivot rows.

    W: (d, k) or a batch (B, d, k) of fp64/fp32/fp16/bf16, on CPU or CUDA; 1 <= rank <= min(d, k).
    pivoting: "partial" (the pivots of torch.linalg.lu) or "none".
    Raises FactorizationError naming the shape, rank and step on bad rank/dtype, NaN/Inf, a
    negligible pivot (judged against the scale of W[:, :rank] and the pivot rows) or factors that
    grow beyond 1/eps. Cost O((d + k) rank^2).
    """
    if not isinstance(W, torch.Tensor) or isinstance(rank, bool) or not isinstance(rank, int):
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise FactorizationError(f"loldu.ldu: expected a tensor W and an int rank, got W {shape}, rank={rank!r}")
    _check_routable(W, "loldu.ldu")
    try:
        return LDUResult(*torch.ops.loldu.ldu(W.detach(), rank, pivoting))
    except (RuntimeError, ValueError) as e:
        raise _op_error(e, FactorizationError) from None


def ldu_from_pivots(W: torch.Tensor, pivots: torch.Tensor) -> LDUResult:
    """Re-derives the frozen factors of W from stored pivot rows (as loaded from an adapter file).

    Equals ldu(W, r) when `pivots` are the pivots ldu chose for W.
    """
    if not isinstance(W, torch.Tensor) or not isinstance(pivots, torch.Tensor):
        raise FactorizationError(f"loldu.ldu_from_pivots: W and pivots must be tensors, got "
                                 f"{type(W).__name__}, {type(pivots).__name__}")
    _check_routable(W, "loldu.ldu_from_pivots")
    try:
        return LDUResult(*torch.ops.loldu.ldu_from_pivots(W.detach(), pivots))
    except (RuntimeError, ValueError) as e:
        raise _op_error(e, FactorizationError) from None


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], PL: torch.Tensor,
                   U: torch.Tensor, c: torch.Tensor, form: str = "auto") -> torch.Tensor:
    """y = x W^T + b with W = W0 + PL diag(c) U, in one of two exact forms (docs/method.md §7).

    x (..., k); weight (d, k); bias (d,) or None; PL (d, r); U (r, k); c (r,) or (..., r) per row.
    form: "delta" computes x W0^T + b + ((x U^T) * c) PL^T and never forms a (d, k) matrix; "dense"
    builds W once per call; "auto" (default) runs the cheaper one by the cost model of
    `choose_form` (n = rows of x, whether a backward follows). Per-row c always runs "delta".
    Gradients flow to x and c; weight, bias, PL and U are treated as frozen. Returns (..., d).
    Under torch.autocast the matmuls run in the autocast dtype and c stays fp32.
    """
    if form == "auto" and _forced != "auto":
        form = _forced
    if not isinstance(form, str) or form not in FORMS:
        raise ShapeError(f"loldu.adapter_linear: form must be 'auto', 'delta' or 'dense', got {form!r}")
    try:
        return torch.ops.loldu.adapter_linear(x, weight, bias, PL, U, c, form)
    except ValueError as e:
        raise _op_error(e, ShapeError) from None


def lu_packed(W: torch.Tensor) -> LUPacked:
    """One getrf of W (d, k) or (B, d, k): the packed LU, perm and D a full-rank layer keeps in place of W.

    The pivots are ldu(W, min(d, k))'s, and its factors are this LU's: PL = L's rows put back in W's
    order, U = triu(LU) / D. Raises FactorizationError on the grounds ldu does (NaN/Inf, a negligible
    pivot, growth beyond 1 / eps).
    """
    if not isinstance(W, torch.Tensor):
        raise FactorizationError(f"loldu.lu_packed: W must be a tensor, got {type(W).__name__}")
    _check_routable(W, "loldu.lu_packed")
    try:
        return LUPacked(*torch.ops.loldu.lu_packed(W.detach()))
    except (RuntimeError, ValueError) as e:
        raise _op_error(e, FactorizationError) from None


def lu_linear(x: torch.Tensor, LU: torch.Tensor, perm: torch.Tensor, D: torch.Tensor, c: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W(c)^T + bias for a full-rank layer kept as its packed LU: W(c)[perm] = L diag(D + c) Ũ.

    x (..., k); LU (d, k) in x's dtype (as lu_packed returns it, cast); perm (d,) int64; D, c (m,) in the
    working dtype (fp32; fp64 for fp64). Two triangular products, one (n, d, k) GEMM's flops, no (d, k)
    temporary. Gradients flow to x and c only. At c == 0 the result is x W0^T within the LU's rounding.
    fp16 x runs its products in fp32 (u = x U^T may exceed fp16's range). Returns (..., d) in x's dtype.
    """
    try:
        return torch.ops.loldu.lu_linear_forward(x, LU, perm, D, c, bias)[0]
    except ValueError as e:
        raise _op_error(e, ShapeError) from None


def delta_weight(PL: torch.Tensor, U: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """ΔW = PL diag(c) U, (d, k), in fp32 (fp64 for fp64 factors). Used by merge."""
    try:
        return torch.ops.loldu.delta_weight(PL, U, c)
    except ValueError as e:
        raise _op_error(e, ShapeError) from None


# -- registrations: fake kernels (shapes only) and the autograd formula -----------------------------
def _ldu_fake_shapes(W, r):
    acc = working_dtype(W.dtype)
    lead = W.shape[:-2]
    d, k = W.shape[-2:]
    return (W.new_empty((*lead, d, r), dtype=acc), W.new_empty((*lead, r), dtype=acc),
            W.new_empty((*lead, r, k), dtype=acc), W.new_empty((*lead, r), dtype=torch.int64))


@torch.library.register_fake("loldu::ldu")
def _ldu_fake(W, rank, pivoting="partial"):
    from .reference import check_ldu_args

    check_ldu_args(W, rank)
    return _ldu_fake_shapes(W, rank)


@torch.library.register_fake("loldu::ldu_from_pivots")
def _ldu_from_pivots_fake(W, pivots):
    if pivots.dtype != torch.int64 or pivots.dim() < 1:
        raise FactorizationError(f"loldu.ldu_from_pivots: pivots must be an int64 tensor (..., r), got {pivots.dtype}")
    return _ldu_fake_shapes(W, pivots.shape[-1])


def _lu_packed_fake(W):
    from .reference import check_ldu_args

    check_ldu_args(W, 1)  # the shapes may be symbolic: min(d, k) is no int here
    acc = working_dtype(W.dtype)
    lead, (d, k) = W.shape[:-2], W.shape[-2:]
    return (W.new_empty(W.shape, dtype=acc), W.new_empty((*lead, d), dtype=torch.int64),
            W.new_empty((*lead, min(d, k)), dtype=acc))


def _register_lu_linear() -> None:
    """Fake kernels and the autograd formula of the compiled lu_linear ops (the reference ones decompose
    into aten ops, CompositeImplicitAutograd, which bring their own)."""
    from .lu_reference import check_lu_args, check_lu_backward_args, lu_compute_dtype

    @torch.library.register_fake("loldu::lu_linear_forward")
    def _forward_fake(x, LU, perm, D, c, bias):
        check_lu_args(x, LU, perm, D, c, bias)
        d, k = LU.shape
        return (x.new_empty((*x.shape[:-1], d)),
                x.new_empty((x.numel() // k, min(d, k)), dtype=lu_compute_dtype(x.dtype)))

    @torch.library.register_fake("loldu::lu_linear_backward")
    def _backward_fake(grad_y, u, LU, perm, D, c, need_grad_x, need_grad_c):
        check_lu_backward_args(grad_y, u, LU, perm, D, c)
        gx = grad_y.new_empty((*grad_y.shape[:-1], LU.shape[1])) if need_grad_x else grad_y.new_empty((0,))
        return gx, (c.new_empty(c.shape) if need_grad_c else c.new_empty((0,)))

    def setup_context(ctx, inputs, output):
        x, LU, perm, D, c, _bias = inputs
        ctx.mark_non_differentiable(output[1])  # u: handed to the backward, never a result
        ctx.set_materialize_grads(False)
        ctx.x_shape = x.shape
        # u only feeds grad_c; without it the backward needs its shape alone (the op checks it).
        u = output[1] if ctx.needs_input_grad[4] else output[1].new_zeros(()).expand(output[1].shape)
        ctx.save_for_backward(u, LU, perm, D, c)

    def backward(ctx, grad, _grad_u):
        u, LU, perm, D, c = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if grad is None or not (need_x or need_c):
            return None, None, None, None, None, None
        gx, gc = torch.ops.loldu.lu_linear_backward(grad, u, LU, perm, D, c, need_x, need_c)
        return (gx.view(ctx.x_shape) if need_x else None), None, None, None, (gc if need_c else None), None

    torch.library.register_autograd("loldu::lu_linear_forward", backward, setup_context=setup_context)


# An extension built before the packed-LU ops existed lacks them: it keeps working without them.
if hasattr(torch.ops.loldu, "lu_packed"):
    torch.library.register_fake("loldu::lu_packed")(_lu_packed_fake)
if _backend.COMPILED and hasattr(torch.ops.loldu, "lu_linear_forward"):
    _register_lu_linear()
    # The compiled adapter_linear_forward is a kernel per device; the reference one decomposes into
    # aten ops (CompositeImplicitAutograd), which bring their own fake kernels and gradients.
    # adapter_linear itself is a composite on both backends.

    @torch.library.register_fake("loldu::adapter_linear_forward")
    def _adapter_linear_forward_fake(x, weight, bias, PL, U, c, form):
        from .reference import _check_resolved

        check_adapter_args(x, weight, bias, PL, U, c)
        _check_resolved(form, "loldu.adapter_linear_forward", c)
        d, k = weight.shape
        y = x.new_empty((*x.shape[:-1], d))
        # The dense W is laid out as weight (the kernel's empty_like), t is (n, r) row-major.
        return y, (torch.empty_like(weight) if form == "dense" else x.new_empty((x.numel() // k, PL.shape[1])))

    @torch.library.register_fake("loldu::adapter_linear_backward")
    def _adapter_linear_backward_fake(grad_y, x, weight, PL, U, c, need_grad_x, need_grad_c=True, form="delta",
                                      saved=None):
        check_adapter_args(x, weight, None, PL, U, c)
        gx = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
        return gx, (c.new_empty(c.shape) if need_grad_c else c.new_empty((0,)))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, PL, U, c, form = inputs
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        saved = output[1]
        ctx.form = form
        ctx.mark_non_differentiable(saved)  # t or W: handed to the backward, never a result
        ctx.set_materialize_grads(False)  # no zeros of saved's shape for its (absent) gradient
        # Only what the backward reads is kept: delta needs t for grad_c and never x; dense needs W
        # for grad_x and x for grad_c. x is otherwise replaced by a stand-in of its shape, dtype and
        # device that holds one element (the backward op checks shapes against it).
        keep_x = form == "dense" and need_c
        keep_saved = need_x if form == "dense" else need_c
        ctx.save_for_backward(x if keep_x else x.new_zeros(()).expand(x.shape), weight, PL, U, c,
                              saved if keep_saved else None)

    def _backward(ctx, grad, _grad_saved):
        x, weight, PL, U, c, saved = ctx.saved_tensors
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        if grad is None or not (need_x or need_c):
            return None, None, None, None, None, None, None
        gx, gc = torch.ops.loldu.adapter_linear_backward(grad, x, weight, PL, U, c, need_x, need_c, ctx.form, saved)
        return (gx if need_x else None), None, None, None, None, (gc if need_c else None), None

    torch.library.register_autograd("loldu::adapter_linear_forward", _backward, setup_context=_setup_context)
