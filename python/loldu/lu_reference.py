"""The full-rank LoLDU layer on the packed LU, written plainly with torch ops (docs/method.md).

At full rank r = m = min(d, k) the factorization is exact (Shi et al., arXiv 2410.13618): W0[perm] = L U
with L unit lower-trapezoidal (d, m) and U = diag(D) Ũ upper-trapezoidal (m, k), and the adapted weight is
W(c)[perm] = L diag(1 + c / D) U. Both factors live in one (d, k) array, LAPACK's getrf layout: L strictly
below the diagonal, U on and above it. The layer never forms W0 or W(c):

  forward   u = x U^T (n, m); y[:, perm] = (u * (1 + c / D)) L^T (+ bias)
  backward  h = g[:, perm] L; grad_c = sum_rows(h * u) / D; grad_x = (h * (1 + c / D)) U

Dtypes: LU in the compute dtype (x's), D and c in the working dtype (fp32; fp64 for fp64). fp16 runs its
products in fp32: fp16's range is too small for u = x U^T (the precision policy of docs/method.md §6), so
the compute dtype is fp32 for fp16 and x's dtype otherwise; u is returned (and saved for the backward) in
that compute dtype, as the product left it. This reference forms the two triangles as (d, m) and (m, k)
copies; the compiled kernels multiply by the packed array in place, block by block.
"""
import torch

from .errors import FactorizationError, ShapeError

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def lu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the LU op's products run in: fp32 for fp16 (range), else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


def _working(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shapes(x, LU, perm, D, c) -> str:
    return (f"x {list(x.shape)}, LU {list(LU.shape)}, perm {list(perm.shape)}, D {list(D.shape)}, "
            f"c {list(c.shape)}")


def _check_factor_args(op: str, LU, perm, D, c, dtype, device, shapes) -> None:
    """LU (d, k) of `dtype`, perm (d,) int64, D and c (m,) in dtype's working dtype, all on `device`."""
    if LU.dim() != 2 or perm.dim() != 1 or D.dim() != 1 or c.dim() != 1:
        raise ShapeError(f"{op}: expected LU (d, k), perm (d,), D (m,), c (m,); got {shapes()}")
    d, k = LU.shape
    m = min(d, k)
    if perm.shape[0] != d or D.shape[0] != m or c.shape[0] != m or m < 1:
        raise ShapeError(f"{op}: LU ({d}, {k}) needs perm ({d},), D ({m},) and c ({m},) with m = min(d, k); "
                         f"got {shapes()}")
    if any(t.device != device for t in (LU, perm, D, c)):
        raise ShapeError(f"{op}: mixed devices {[str(t.device) for t in (LU, perm, D, c)]}; shapes: {shapes()}")
    if dtype not in _FLOATS:
        raise ShapeError(f"{op}: x must be float64, float32, float16 or bfloat16, got {dtype}; shapes: {shapes()}")
    if LU.dtype != dtype:
        raise ShapeError(f"{op}: LU is {LU.dtype} but x is {dtype} (LU is kept in the compute dtype); "
                         f"shapes: {shapes()}")
    if perm.dtype != torch.int64:
        raise ShapeError(f"{op}: perm must be torch.int64, got {perm.dtype}; shapes: {shapes()}")
    acc = _working(dtype)
    if D.dtype != acc or c.dtype != acc:
        raise ShapeError(f"{op}: D and c must be {acc} for x of {dtype}, got {D.dtype} and {c.dtype}; "
                         f"shapes: {shapes()}")


def check_lu_args(x, LU, perm, D, c, bias) -> None:
    """lu_linear's arguments (see ops.lu_linear); ShapeError naming every shape."""
    op = "loldu.lu_linear"
    if x.dim() < 1 or LU.dim() != 2 or x.shape[-1] != LU.shape[-1]:
        raise ShapeError(f"{op}: x (..., k) must match LU (d, k); got {_shapes(x, LU, perm, D, c)}")
    _check_factor_args(op, LU, perm, D, c, x.dtype, x.device, lambda: _shapes(x, LU, perm, D, c))
    if bias is not None and (tuple(bias.shape) != (LU.shape[0],) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ShapeError(f"{op}: bias must be ({LU.shape[0]},) of {x.dtype} on {x.device}, got "
                         f"{list(bias.shape)} of {bias.dtype} on {bias.device}")


def check_lu_backward_args(grad_y, u, LU, perm, D, c) -> None:
    op = "loldu.lu_linear_backward"

    def shapes():
        return f"grad_y {list(grad_y.shape)}, u {list(u.shape)}, " + _shapes(grad_y, LU, perm, D, c)[2:]

    if grad_y.dim() < 1 or LU.dim() != 2 or grad_y.shape[-1] != LU.shape[0]:
        raise ShapeError(f"{op}: grad_y (..., d) must match LU (d, k); got {shapes()}")
    _check_factor_args(op, LU, perm, D, c, grad_y.dtype, grad_y.device, shapes)
    n, m = grad_y.numel() // LU.shape[0], min(LU.shape)
    if tuple(u.shape) != (n, m) or u.dtype != lu_compute_dtype(grad_y.dtype) or u.device != grad_y.device:
        raise ShapeError(f"{op}: u must be ({n}, {m}) of {lu_compute_dtype(grad_y.dtype)} (x U^T as the forward "
                         f"returned it), got {list(u.shape)} of {u.dtype}; shapes: {shapes()}")


def _triangles(LU, dtype):
    """(L (d, m) unit lower, U (m, k) upper) of the packed LU, in dtype."""
    A = LU.detach().to(dtype)
    d, k = A.shape
    m = min(d, k)
    return A[:, :m].tril(-1) + torch.eye(d, m, dtype=dtype, device=A.device), A[:m].triu()


def lu_linear_forward_reference(x, LU, perm, D, c, bias):
    """(y, u): y = x W(c)^T + bias (..., d), u = x U^T (n, m) in the compute dtype."""
    check_lu_args(x, LU, perm, D, c, bias)
    cd = lu_compute_dtype(x.dtype)
    d, k = LU.shape
    with torch.autocast(x.device.type, enabled=False):
        L, U = _triangles(LU, cd)
        u = x.reshape(-1, k).to(cd) @ U.t()
        yP = (u * (1 + c / D.detach()).to(cd)) @ L.t()
        y = yP.index_select(1, torch.argsort(perm))  # y[:, perm[i]] = yP[:, i]
        if bias is not None:
            y = y + bias.detach().to(cd)
    return y.to(x.dtype).view(*x.shape[:-1], d), u


def lu_linear_backward_reference(grad_y, u, LU, perm, D, c, need_grad_x: bool, need_grad_c: bool):
    """(grad_x (..., k) in grad_y's dtype, grad_c (m,)); an empty tensor for a gradient not asked for."""
    check_lu_backward_args(grad_y, u, LU, perm, D, c)
    cd = lu_compute_dtype(grad_y.dtype)
    d, k = LU.shape
    grad_x, grad_c = grad_y.new_empty((0,)), c.new_empty((0,))
    if not (need_grad_x or need_grad_c):
        return grad_x, grad_c
    with torch.autocast(grad_y.device.type, enabled=False):
        L, U = _triangles(LU, cd)
        h = grad_y.reshape(-1, d).to(cd).index_select(1, perm) @ L
        if need_grad_c:
            grad_c = (h.to(c.dtype) * u.to(c.dtype)).sum(0) / D
        if need_grad_x:
            grad_x = ((h * (1 + c / D).to(cd)) @ U).to(grad_y.dtype).view(*grad_y.shape[:-1], k)
    return grad_x, grad_c


def perm_from_pivots(pivots: torch.Tensor, d: int) -> torch.Tensor:
    """LAPACK's 1-based row interchanges (ipiv, applied in turn) as the permutation perm with
    W[perm] = L U, batched over leading dims."""
    flat = pivots.reshape(-1, pivots.shape[-1]).tolist()
    perms = []
    for ipiv in flat:
        p = list(range(d))
        for j, q in enumerate(ipiv):
            p[j], p[q - 1] = p[q - 1], p[j]
        perms.append(p)
    return torch.tensor(perms, dtype=torch.int64, device=pivots.device).view(*pivots.shape[:-1], d)


def lu_packed_reference(W):
    """(LU, perm, D) of the full-rank factorization (LAPACK's getrf through torch.linalg), refused on the
    same grounds as ldu at rank min(d, k): NaN/Inf, a subnormal panel, a negligible pivot, growth."""
    from .reference import check_factors, check_ldu_args, check_panel_scale, working_dtype

    if not isinstance(W, torch.Tensor):
        raise FactorizationError(f"loldu.lu_packed: W must be a tensor, got {type(W).__name__}")
    check_ldu_args(W, min(W.shape[-2:]) if W.dim() in (2, 3) else 1)
    W3 = W if W.dim() == 3 else W.unsqueeze(0)
    B, d, k = W3.shape
    m = min(d, k)
    if not torch.isfinite(W3).all():
        b, i, j = (int(v) for v in (~torch.isfinite(W3)).nonzero()[0])
        item = f" (batch item {b})" if W.dim() == 3 else ""
        raise FactorizationError(f"loldu.lu_packed: NaN or Inf at W[{i}, {j}] for W of shape {tuple(W.shape)}{item}")
    check_panel_scale(W3, m)
    LU, pivots, _ = torch.linalg.lu_factor_ex(W3.to(working_dtype(W.dtype)))
    LU, perm = LU.contiguous(), perm_from_pivots(pivots, d)
    D = LU.diagonal(dim1=-2, dim2=-1).clone()
    L = LU[:, :, :m].tril(-1) + torch.eye(d, m, dtype=LU.dtype, device=LU.device)
    PL = torch.empty_like(L).scatter_(1, perm[:, :, None].expand(B, d, m), L)
    check_factors(W3, PL, D, LU[:, :m].triu() / D[:, :, None], perm[:, :m].contiguous())
    out = (LU, perm, D)
    return out if W.dim() == 3 else tuple(t[0] for t in out)
