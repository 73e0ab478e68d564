"""The pure-PyTorch reference: the math of the ops written plainly with torch ops (docs/method.md).

It is what the compiled kernels are tested against, and, where no extension can be built, it is
registered as the implementation of the very same `torch.ops.loldu.*` schemas (`define_ops`), so
every caller goes through the ops either way. The argument checks here are the Python side of the
ops' checks: the reference kernels and the fake (meta) kernels of both backends run them.
"""
import torch
import torch.nn.functional as F

from . import form_cost
from .errors import FactorizationError, ShapeError
from .lu_reference import lu_linear_backward_reference, lu_linear_forward_reference, lu_packed_reference
from .op_schemas import SCHEMAS
from .spec import FORMS

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device: False where autocast does not exist (e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_ldu_args(W: torch.Tensor, rank) -> None:
    shape = tuple(W.shape) if isinstance(W, torch.Tensor) else None
    if not isinstance(W, torch.Tensor) or W.dim() not in (2, 3):
        raise FactorizationError(f"loldu.ldu: W must be a (d, k) or (B, d, k) tensor, got {shape}")
    if W.is_quantized or W.dtype not in FLOAT_DTYPES:
        raise FactorizationError(f"loldu.ldu: W must be fp64, fp32, fp16 or bf16, got {W.dtype} of shape {shape}")
    m = min(W.shape[-2], W.shape[-1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= m:
        raise FactorizationError(
            f"loldu.ldu: rank must be an int in [1, min(d, k)] = [1, {m}] for W of shape {shape}, got rank={rank!r}")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the factorization and the coefficients c are computed in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_pivots(W: torch.Tensor, pivots) -> None:
    """Stored pivots for ldu_from_pivots: int64 (..., r), distinct, in [0, d), batch matching W."""
    if not isinstance(pivots, torch.Tensor) or pivots.dtype != torch.int64 or pivots.dim() < 1:
        raise FactorizationError(f"loldu.ldu_from_pivots: pivots must be an int64 tensor (..., r), got {pivots!r}")
    check_ldu_args(W, pivots.shape[-1])
    if pivots.dim() != W.dim() - 1 or (W.dim() == 3 and pivots.shape[0] != W.shape[0]):
        raise FactorizationError(f"loldu.ldu_from_pivots: batch of pivots {tuple(pivots.shape)} does not match W "
                                 f"{tuple(W.shape)}")
    d = W.shape[-2]
    if pivots.numel() and (int(pivots.min()) < 0 or int(pivots.max()) >= d):
        raise FactorizationError(f"loldu.ldu_from_pivots: pivot index out of range [0, {d}) for W of shape {tuple(W.shape)}")
    s = pivots.sort(dim=-1).values
    if (s[..., 1:] == s[..., :-1]).any():
        raise FactorizationError(f"loldu.ldu_from_pivots: repeated pivot index for W of shape {tuple(W.shape)}")


def check_adapter_args(x, weight, bias, PL, U, c, autocast: bool = False) -> None:
    """adapter_linear's arguments (see ops.adapter_linear); dtypes are not compared under autocast."""
    def shapes():  # only formatted when a check fails; shapes as the C++ kernels print them
        return (f"x {list(x.shape)}, weight {list(weight.shape)}, PL {list(PL.shape)}, "
                f"U {list(U.shape)}, c {list(c.shape)}")

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
        raise ShapeError(f"loldu.adapter_linear: bias must be ({d},), got {list(bias.shape)}")
    tensors = [weight, PL, U, c] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ShapeError(f"loldu.adapter_linear: mixed devices {[str(t.device) for t in [x] + tensors]}; shapes: {shapes()}")
    if autocast:
        return
    if x.dtype not in FLOAT_DTYPES:
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


def check_delta_args(PL, U, c) -> None:
    if PL.dim() != 2 or U.dim() != 2 or c.dim() != 1 or PL.shape[1] != U.shape[0] or c.shape[0] != U.shape[0]:
        raise ShapeError(f"loldu.delta_weight: expected PL (d, r), U (r, k), c (r,); got PL {tuple(PL.shape)}, "
                         f"U {tuple(U.shape)}, c {tuple(c.shape)}")


def ldu_reference(W: torch.Tensor, rank: int, pivoting: str = "partial", pivots=None):
    """Unblocked right-looking LU on the (d, r) panel, one vectorized step per column.

    Returns (PL, D, U, pivots) like loldu.ldu; pivots, if given, are imposed instead of chosen.
    """
    check_ldu_args(W, rank)
    if pivoting not in ("partial", "none"):
        raise FactorizationError(f"loldu.ldu: pivoting must be 'partial' or 'none', got {pivoting!r}")
    batched = W.dim() == 3
    A = (W if batched else W.unsqueeze(0)).to(working_dtype(W.dtype))
    B, d, k = A.shape
    r = rank
    P = A[:, :, :r].clone()
    if not torch.isfinite(P).all():
        b, i, j = (int(v) for v in (~torch.isfinite(P)).nonzero()[0])
        raise FactorizationError(f"loldu.ldu: NaN or Inf in panel W[:, :r] at W[{i}, {j}] for {_where(A, b, r, W.shape)}")
    check_panel_scale(W if batched else W.unsqueeze(0), r)
    tol = d * torch.finfo(P.dtype).eps * P.abs().amax(dim=(1, 2))
    perm = torch.arange(d, device=W.device).repeat(B, 1)
    bidx = torch.arange(B, device=W.device)
    if pivots is not None:
        forced = (pivots if batched else pivots.unsqueeze(0)).to(W.device)
    for j in range(r):
        if pivots is not None:
            p = (perm == forced[:, j : j + 1]).int().argmax(dim=1)
        elif pivoting == "partial":
            p = P[:, j:, j].abs().argmax(dim=1) + j
        else:
            p = torch.full((B,), j, device=W.device)
        rows_j, rows_p = P[bidx, j].clone(), P[bidx, p].clone()
        P[bidx, j], P[bidx, p] = rows_p, rows_j
        pj, pp = perm[bidx, j].clone(), perm[bidx, p].clone()
        perm[bidx, j], perm[bidx, p] = pp, pj
        piv = P[:, j, j]
        bad = ~(piv.abs() > tol)
        if bad.any():
            b = int(bad.nonzero()[0])
            raise FactorizationError(
                f"loldu.ldu: negligible pivot {float(piv[b]):.3g} (tolerance {float(tol[b]):.3g}) at step {j} of {r} "
                f"for {_where(A, b, r, W.shape)}: the leading columns are rank-deficient; lower the rank")
        P[:, j + 1 :, j] /= piv[:, None]
        P[:, j + 1 :, j + 1 :] -= P[:, j + 1 :, j : j + 1] * P[:, j : j + 1, j + 1 :]
    L = P.tril(-1) + torch.eye(d, r, dtype=P.dtype, device=P.device)
    U11 = P[:, :r, :].triu()
    D = U11.diagonal(dim1=1, dim2=2).clone()
    PL = torch.empty_like(L).scatter_(1, perm[:, :, None].expand(B, d, r), L)
    I = perm[:, :r].clone()
    rows = A.gather(1, I[:, :, None].expand(B, r, k))
    if not torch.isfinite(rows).all():
        b, i, j = (int(v) for v in (~torch.isfinite(rows)).nonzero()[0])
        raise FactorizationError(f"loldu.ldu: NaN or Inf in pivot row at W[{int(I[b, i])}, {j}] for "
                                 f"{_where(A, b, r, W.shape)}")
    Ufull = torch.linalg.solve_triangular(L[:, :r, :], rows, upper=False, unitriangular=True)
    U = Ufull / D[:, :, None]
    U[:, :, :r] = U11 / D[:, :, None]
    check_factors(W if batched else W.unsqueeze(0), PL, D, U, I)
    out = tuple(t.contiguous() for t in (PL, D, U, I))  # row-major, as the compiled kernels return them
    return out if batched else tuple(t[0] for t in out)


def _where(W3: torch.Tensor, b: int, r: int, shape=None) -> str:
    """Names W's shape (as given), the batch item when batched, and the rank."""
    if shape is None:
        shape = W3.shape[1:] if W3.shape[0] == 1 else W3.shape
    item = f" (batch item {b})" if len(shape) == 3 else ""
    return f"W of shape {tuple(shape)}{item}, rank={r}"


def check_panel_scale(W3: torch.Tensor, r: int) -> None:
    """Refuses a panel W[:, :r] in the subnormal range, where the pivots cannot be accurate."""
    acc = working_dtype(W3.dtype)
    floor = torch.finfo(acc).tiny / torch.finfo(acc).eps
    amax = W3[:, :, :r].abs().amax(dim=(1, 2)).double().cpu()
    for b, a in enumerate(amax.tolist()):
        if 0 < a < floor:  # an all-zero panel is a plain zero pivot
            raise FactorizationError(
                f"loldu.ldu: the leading columns W[:, :r] are too small to factorize in {str(acc)[6:]}: "
                f"max |W[:, :r]| = {a:.6g} is below {floor:.6g} (the smallest normal number / machine epsilon; "
                f"pivots would be subnormal) for {_where(W3, b, r)}. Rescale the weight or lower the rank")


def check_factors(W3: torch.Tensor, PL, D, U, I) -> None:
    """Pivots judged against the scale of W[:, :r] and of the pivot rows (which span every column),
    and the factors' growth bounded by 1 / eps: no non-finite or absurdly scaled factor is returned."""
    B, d, k = W3.shape
    r = D.shape[1]
    eps = torch.finfo(D.dtype).eps
    limit = 1.0 / eps
    rows = W3.gather(1, I[:, :, None].expand(B, r, k))
    scale = torch.maximum(W3[:, :, :r].abs().amax(dim=(1, 2)), rows.abs().amax(dim=(1, 2))).to(D.dtype)
    tol = scale * d * eps
    u_max, pl_max = U.abs().amax(dim=(1, 2)), PL.abs().amax(dim=(1, 2))
    ok = (D.abs() > tol[:, None]).all(1) & (u_max <= limit) & (pl_max <= limit)
    if bool(ok.all()):
        return
    for b in range(B):
        for j in range(r):
            if not abs(float(D[b, j])) > float(tol[b]):
                raise FactorizationError(
                    f"loldu.ldu: negligible pivot {float(D[b, j]):.6g} at step {j} of {r} against the weight's scale "
                    f"{float(scale[b]):.6g} (max |W| over the leading r columns and the pivot rows; tolerance "
                    f"{float(tol[b]):.6g}) for {_where(W3, b, r)}: the leading columns are (nearly) rank-deficient or "
                    "scaled far below the rest of the weight, so the factors would be absurdly large; lower the rank")
        for name, m in (("U", u_max), ("PL", pl_max)):
            if not float(m[b]) <= limit:
                raise FactorizationError(
                    f"loldu.ldu: the factor {name} grows to max |{name}| = {float(m[b]):.6g} (limit {limit:.6g} = "
                    f"1 / machine epsilon) for {_where(W3, b, r)}: the leading block is too ill-conditioned to "
                    "train; lower the rank or use pivoting='partial'")


def adapter_linear_reference(x, weight, bias, PL, U, c):
    """y = x W0^T + b + ((x U^T) * c) PL^T, by plain torch ops (autograd and autocast see through it)."""
    t = x @ U.to(x.dtype).t()
    return F.linear(x, weight, bias) + (t * c.to(x.dtype)) @ PL.to(x.dtype).t()


def dense_weight_reference(weight, PL, U, c):
    """The dense form's weight W = W0 + PL diag(c) U, in W0's dtype."""
    return weight + (PL * c.to(PL.dtype)) @ U


def _check_resolved(form, op: str, c) -> str:
    if form not in ("delta", "dense"):
        raise ShapeError(f"{op}: form must be 'delta' or 'dense' here ('auto' is resolved by "
                         f"loldu.adapter_linear), got {form!r}")
    if form == "dense" and c.dim() != 1:
        raise ShapeError(f"{op}: the dense form needs one c (r,) for all rows, got c {list(c.shape)} "
                         "(per-row c runs the delta form)")
    return form


def adapter_linear_forward_reference(x, weight, bias, PL, U, c, form):
    """(y, saved) of a resolved form: saved is t = x U^T (n, r) for "delta", W (d, k) for "dense"."""
    check_adapter_args(x, weight, bias, PL, U, c, autocast=autocast_enabled(x.device.type))
    _check_resolved(form, "loldu.adapter_linear_forward", c)
    # weight, bias, PL and U are frozen, as in the compiled op's gradient formula.
    weight, PL, U = weight.detach(), PL.detach(), U.detach()
    bias = None if bias is None else bias.detach()
    if form == "dense":
        W = dense_weight_reference(weight, PL, U, c)
        return F.linear(x, W, bias), W
    t = x.reshape(-1, x.shape[-1]) @ U.to(x.dtype).t()
    cx = c.to(x.dtype).reshape(-1, PL.shape[1])
    y = F.linear(x, weight, bias) + ((t * cx) @ PL.to(x.dtype).t()).view(*x.shape[:-1], weight.shape[0])
    return y, t


def adapter_linear_backward_reference(grad_y, x, weight, PL, U, c, need_grad_x: bool, need_grad_c: bool = True,
                                      form: str = "delta", saved=None):
    """(grad_x, grad_c) of adapter_linear in either form; an empty tensor stands for a gradient not asked for.

    delta: h = g PL, grad_c = sum over rows of t * h, grad_x = g W0 + (h c) U.
    dense: grad_x = g W, grad_c = diag(PL^T (g^T x) U^T).
    """
    check_adapter_args(x, weight, None, PL, U, c)
    _check_resolved(form, "loldu.adapter_linear_backward", c)
    d, k = weight.shape
    if grad_y.shape[-1] != d or grad_y.numel() // d != x.numel() // k:
        raise ShapeError(f"loldu.adapter_linear_backward: grad_y {tuple(grad_y.shape)} does not match x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    r = PL.shape[1]
    g = grad_y.reshape(-1, d).to(x.dtype)
    x2 = x.reshape(-1, k)
    acc = working_dtype(x.dtype)
    want = (d, k) if form == "dense" else (x2.shape[0], r)
    if saved is not None and (tuple(saved.shape) != want or saved.dtype != x.dtype):
        raise ShapeError(f"loldu.adapter_linear_backward: saved must be {want} of {x.dtype} for the {form} form, "
                         f"got {tuple(saved.shape)} of {saved.dtype}")
    grad_x, grad_c = x.new_empty((0,)), c.new_empty((0,))
    if form == "dense":
        if need_grad_x:
            W = saved if saved is not None else dense_weight_reference(weight, PL, U, c)
            grad_x = (g @ W).view(x.shape)
        if need_grad_c:
            grad_c = ((PL.t().to(acc) @ (g.t() @ x2).to(acc)) * U.to(acc)).sum(1).to(c.dtype)
        return grad_x, grad_c
    h = g @ PL
    if need_grad_c:
        t = saved if saved is not None else x2 @ U.t()
        if c.dim() == 1:
            grad_c = (t.to(acc) * h.to(acc)).sum(0).to(c.dtype)
        else:
            grad_c = (t * h).to(c.dtype).view(c.shape)
    if need_grad_x:
        grad_x = (g @ weight + (h * c.to(x.dtype).reshape(-1, r)) @ U).view(x.shape)
    return grad_x, grad_c


# -- form="auto": the cost model of form_cost.py, on torch's dtypes and devices -------------------
def dense_min_rows(d: int, k: int, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu", *,
                   need_grad_x: bool = True, need_grad_c: bool = True):
    """The smallest number of rows n from which form="auto" runs the dense form; None when never.

    need_grad_x / need_grad_c: which gradients the backward computes (both False: a forward only).
    """
    elem = 8.0 if dtype == torch.float64 else (2.0 if dtype in (torch.float16, torch.bfloat16) else 4.0)
    n = form_cost.dense_min_rows(float(d), float(k), float(r), device == "cuda", device == "cpu", elem,
                                 need_grad_x, need_grad_c)
    return None if n == form_cost.NEVER else int(n)


def choose_form(n: int, d: int, k: int, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu", *,
                need_grad_x: bool = True, need_grad_c: bool = True) -> str:
    """"delta" or "dense": the form form="auto" runs for n rows of a (d, k) layer at rank r."""
    m = dense_min_rows(d, k, r, dtype, device, need_grad_x=need_grad_x, need_grad_c=need_grad_c)
    return "dense" if m is not None and n >= m else "delta"


def resolve_form(x, weight, PL, c, form) -> str:
    """The form adapter_linear runs: "auto" by the cost model (a backward counts when grad mode is on
    and x or c requires grad), per-row c always "delta". ShapeError naming a bad form."""
    if not isinstance(form, str) or form not in FORMS:
        raise ShapeError(f"loldu.adapter_linear: form must be 'auto', 'delta' or 'dense', got {form!r}")
    if form == "delta" or c.dim() != 1:
        return "delta"
    if form == "dense":
        return "dense"
    if weight.dim() != 2 or PL.dim() != 2 or x.dim() < 1:
        return "delta"  # the kernel's checks report it
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if autocast_enabled(dev) else x.dtype
    grad = torch.is_grad_enabled()
    d, k, r = int(weight.shape[0]), int(weight.shape[1]), int(PL.shape[1])
    m = dense_min_rows(d, k, r, dtype, dev, need_grad_x=grad and x.requires_grad,
                       need_grad_c=grad and c.requires_grad)
    # Only the inequality is guarded under torch.compile with a dynamic number of rows.
    return "dense" if m is not None and x.numel() >= k * m else "delta"


def delta_weight_reference(PL, U, c):
    """ΔW = PL diag(c) U in the working dtype of the factors (fp32; fp64 for fp64)."""
    check_delta_args(PL, U, c)
    acc = working_dtype(PL.dtype)
    return (PL.to(acc) * c.to(acc)) @ U.to(acc)


def _adapter_linear_kernel(x, weight, bias, PL, U, c, form="auto"):
    resolved = resolve_form(x, weight, PL, c, form)
    return torch.ops.loldu.adapter_linear_forward(x, weight, bias, PL, U, c, resolved)[0]


def _ldu_kernel(W, rank, pivoting="partial"):
    return ldu_reference(W, rank, pivoting)


def _ldu_from_pivots_kernel(W, pivots):
    check_pivots(W, pivots)
    return ldu_reference(W, pivots.shape[-1], "partial", pivots=pivots)


_LIBRARY = None


def define_ops() -> None:
    """Defines the `loldu` ops with the reference kernels (when no compiled library defines them).

    adapter_linear, its forward and backward and delta_weight are CompositeImplicitAutograd: they decompose into
    aten ops, so autograd, autocast and fake tensors come from those ops. The factorizations are
    CompositeExplicitAutograd (no gradient; their fake kernels are registered in ops.py). The full-rank
    packed-LU ops (lu_packed, lu_linear_forward, lu_linear_backward) follow the same split (lu_reference.py).
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("loldu", "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    lib.impl("ldu", _ldu_kernel, "CompositeExplicitAutograd")
    lib.impl("ldu_from_pivots", _ldu_from_pivots_kernel, "CompositeExplicitAutograd")
    lib.impl("adapter_linear", _adapter_linear_kernel, "CompositeImplicitAutograd")
    lib.impl("adapter_linear_forward", adapter_linear_forward_reference, "CompositeImplicitAutograd")
    lib.impl("adapter_linear_backward", adapter_linear_backward_reference, "CompositeImplicitAutograd")
    lib.impl("delta_weight", delta_weight_reference, "CompositeImplicitAutograd")
    lib.impl("lu_packed", lu_packed_reference, "CompositeExplicitAutograd")
    lib.impl("lu_linear_forward", lu_linear_forward_reference, "CompositeImplicitAutograd")
    lib.impl("lu_linear_backward", lu_linear_backward_reference, "CompositeImplicitAutograd")
    _LIBRARY = lib
