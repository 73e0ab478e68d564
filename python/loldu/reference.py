"""The pure-PyTorch reference path: the math of LOLDU.md written plainly with torch ops.

It is what the compiled ops are tested against and what runs where no extension can be built.
"""
import torch
import torch.nn.functional as F

from .errors import FactorizationError


def check_ldu_args(W: torch.Tensor, rank) -> None:
    shape = tuple(W.shape) if isinstance(W, torch.Tensor) else None
    if not isinstance(W, torch.Tensor) or W.dim() not in (2, 3):
        raise FactorizationError(f"loldu.ldu: W must be a (d, k) or (B, d, k) tensor, got {shape}")
    if W.is_quantized or W.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise FactorizationError(f"loldu.ldu: W must be fp64, fp32, fp16 or bf16, got {W.dtype} of shape {shape}")
    m = min(W.shape[-2], W.shape[-1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= m:
        raise FactorizationError(
            f"loldu.ldu: rank must be an int in [1, min(d, k)] = [1, {m}] for W of shape {shape}, got rank={rank!r}")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        raise FactorizationError(f"loldu.ldu: NaN or Inf in panel W[:, :r] for W of shape {tuple(W.shape)}, rank={r}")
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
                f"for W of shape {tuple(W.shape)}, rank={r}: the leading columns are rank-deficient; lower the rank")
        P[:, j + 1 :, j] /= piv[:, None]
        P[:, j + 1 :, j + 1 :] -= P[:, j + 1 :, j : j + 1] * P[:, j : j + 1, j + 1 :]
    L = P.tril(-1) + torch.eye(d, r, dtype=P.dtype, device=P.device)
    U11 = P[:, :r, :].triu()
    D = U11.diagonal(dim1=1, dim2=2).clone()
    PL = torch.empty_like(L).scatter_(1, perm[:, :, None].expand(B, d, r), L)
    I = perm[:, :r].clone()
    rows = A.gather(1, I[:, :, None].expand(B, r, k))
    if not torch.isfinite(rows).all():
        raise FactorizationError(f"loldu.ldu: NaN or Inf in pivot row for W of shape {tuple(W.shape)}, rank={r}")
    Ufull = torch.linalg.solve_triangular(L[:, :r, :], rows, upper=False, unitriangular=True)
    U = Ufull / D[:, :, None]
    U[:, :, :r] = U11 / D[:, :, None]
    check_factors(W if batched else W.unsqueeze(0), PL, D, U, I)
    out = (PL, D, U, I)
    return out if batched else tuple(t[0] for t in out)


def _where(W3: torch.Tensor, b: int, r: int) -> str:
    shape = tuple(W3.shape[1:]) if W3.shape[0] == 1 else tuple(W3.shape)
    item = f" (batch item {b})" if W3.shape[0] > 1 else ""
    return f"W of shape {shape}{item}, rank={r}"


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
    """y = x W0^T + b + ((x U^T) * c) PL^T, by plain torch ops (autograd does the backward)."""
    t = x @ U.to(x.dtype).t()
    return F.linear(x, weight, bias) + (t * c.to(x.dtype)) @ PL.to(x.dtype).t()


def delta_weight_reference(PL, U, c):
    acc = working_dtype(PL.dtype)
    return (PL.to(acc) * c.to(acc)) @ U.to(acc)
