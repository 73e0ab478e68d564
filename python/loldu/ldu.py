"""The leading-r LDU factorization of a weight matrix (LOLDU.md, facts 1, 2 and 6)."""
from typing import NamedTuple

import torch

from . import _backend
from .errors import FactorizationError
from .reference import check_ldu_args, ldu_reference


class LDUResult(NamedTuple):
    """PL (..., d, r) in W's row order; D (..., r); U (..., r, k) unit upper; pivots (..., r) int64.

    Factors are fp64 for fp64 W and fp32 otherwise (fp16/bf16 are factorized in fp32).
    """

    PL: torch.Tensor
    D: torch.Tensor
    U: torch.Tensor
    pivots: torch.Tensor


def _call(op, *args):
    try:
        return LDUResult(*op(*args))
    except (RuntimeError, ValueError) as e:
        msg = str(e).split("\nException raised from")[0]
        raise FactorizationError(msg) from None


def ldu(W: torch.Tensor, rank: int, *, pivoting: str = "partial") -> LDUResult:
    """Leading-`rank` components of W = P L D U, reading only W[:, :rank] and the pivot rows.

    W: (d, k) or a batch (B, d, k) of fp64/fp32/fp16/bf16, on CPU or CUDA; 1 <= rank <= min(d, k).
    pivoting: "partial" (the pivots of torch.linalg.lu) or "none".
    Raises FactorizationError naming the shape, rank and step on bad rank/dtype, NaN/Inf,
    or a negligible pivot. Cost O((d + k) rank^2).
    """
    check_ldu_args(W, rank)
    W = W.detach()
    if _backend.HAS_OPS:
        return _call(torch.ops.loldu.ldu, W, rank, pivoting)
    return LDUResult(*ldu_reference(W, rank, pivoting))


def ldu_from_pivots(W: torch.Tensor, pivots: torch.Tensor) -> LDUResult:
    """Re-derives the frozen factors of W from stored pivot rows (as loaded from an adapter file).

    Equals ldu(W, r) when `pivots` are the pivots ldu chose for W.
    """
    if not isinstance(pivots, torch.Tensor) or pivots.dtype != torch.int64 or pivots.dim() < 1:
        raise FactorizationError(f"loldu.ldu_from_pivots: pivots must be an int64 tensor (..., r), got {pivots!r}")
    check_ldu_args(W, pivots.shape[-1])
    W = W.detach()
    d = W.shape[-2]
    if pivots.numel() and (int(pivots.min()) < 0 or int(pivots.max()) >= d):
        raise FactorizationError(f"loldu.ldu_from_pivots: pivot index out of range [0, {d}) for W of shape {tuple(W.shape)}")
    if _backend.HAS_OPS:
        return _call(torch.ops.loldu.ldu_from_pivots, W, pivots)
    s = pivots.sort(dim=-1).values
    if (s[..., 1:] == s[..., :-1]).any():
        raise FactorizationError(f"loldu.ldu_from_pivots: repeated pivot index for W of shape {tuple(W.shape)}")
    return LDUResult(*ldu_reference(W, pivots.shape[-1], "partial", pivots=pivots))


if _backend.HAS_OPS:

    def _ldu_fake_shapes(W, r):
        acc = torch.float64 if W.dtype == torch.float64 else torch.float32
        lead = W.shape[:-2]
        d, k = W.shape[-2:]
        return (W.new_empty((*lead, d, r), dtype=acc), W.new_empty((*lead, r), dtype=acc),
                W.new_empty((*lead, r, k), dtype=acc), W.new_empty((*lead, r), dtype=torch.int64))

    @torch.library.register_fake("loldu::ldu")
    def _ldu_fake(W, rank, pivoting="partial"):
        return _ldu_fake_shapes(W, rank)

    @torch.library.register_fake("loldu::ldu_from_pivots")
    def _ldu_from_pivots_fake(W, pivots):
        return _ldu_fake_shapes(W, pivots.shape[-1])
