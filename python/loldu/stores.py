"""Factor stores: how a LoLDU layer keeps its frozen factors, and the adapter branch computed from
them (docs/method.md §3, §8; docs/storage.md).

A store keeps its factors as non-persistent buffers of the layer module (FACTOR_KEYS, plus loldu_D
and loldu_pivots): they are re-derived from W0, so they stay out of `state_dict()` but follow
`.to()` and DDP's buffer broadcast. It serves the base matrix W0 and the base output, the adapter
branch for any kind (loldu.kinds) in the precision one forward's policy chose (loldu.precision),
the full factors PL and U (merge, inspection, export) and ΔW. The layer reads W0 and the base
output through the store (base_matrix, base_output), so a store may keep W0 itself in another form.
A store object holds no tensor itself (only the largest stored magnitude, which decides the dtypes
casts may store them in); every method takes the layer.

- "full": PL (d, r) and U (r, k).
- "cur": the unit triangles L11 = PL[pivots] and U11 = U[:, :r] packed in one (r, r) matrix LU11
  (L11 below the diagonal, U11 above it, ones on it: the triangular solves read one triangle each
  and assume the unit diagonal); W0[:, :r] and W0[pivots, :] are read from the base weight itself.
"""
import contextlib
import warnings
from typing import Dict, Optional, Tuple

import torch

from .errors import AdapterError
from .integrity import record_factor_source
from .kinds import KINDS
from .ldu import LDUResult
from .ops import adapter_linear, delta_weight, working_dtype
from .precision import Precision, wide

# A frozen factor is stored in a dtype only while max |PL| and max |U| stay below that dtype's
# largest value divided by this headroom (fp16: 256), so that the sums and products formed from the
# stored factors stay finite; otherwise it is kept in fp32 (docs/method.md §6). Partial pivoting
# bounds |PL| by 1, and at small ranks |U| is O(1) on trained weights, so only badly scaled columns
# or high ranks reach it. (The adapter branch itself runs in fp32 whenever a layer computes in fp16.)
FACTOR_HEADROOM = 256.0

Reads = Tuple[torch.Tensor, torch.Tensor]  # what the factorization reads of W0: W0[:, :r], W0[pivots, :]


def holds(dtype: torch.dtype, peak: float) -> bool:
    """Whether factors whose largest magnitude is `peak` may be stored in `dtype` (FACTOR_HEADROOM)."""
    return not dtype.is_floating_point or peak <= torch.finfo(dtype).max / FACTOR_HEADROOM


class FactorStore:
    """How a layer keeps its frozen factors. keys: its factor buffers; peak_names: how warnings name
    what `peak` (the largest stored magnitude) measures."""

    name = ""
    keys: Tuple[str, ...] = ()
    peak_names = ""

    def __init__(self):
        self.peak = 0.0

    @staticmethod
    def numbers(d: int, k: int, r: int) -> int:
        """How many factor entries a (d, k) layer at rank r keeps (factor_bytes)."""
        raise NotImplementedError

    def pack(self, factors: LDUResult) -> Tuple[torch.Tensor, ...]:
        """The buffers (in the order of keys) that keep `factors`."""
        raise NotImplementedError

    # -- the buffers ----------------------------------------------------------------------------
    def set_factors(self, layer, factors: LDUResult, factor_dtype: torch.dtype, d_dtype: torch.dtype,
                    stacklevel: int) -> None:
        """Stores `factors` as this store's buffers on `layer` (any other store's go) in `factor_dtype`
        (in fp32, with a warning naming the layer, when that dtype cannot hold them), D in `d_dtype`,
        and the pivots."""
        stored = self.pack(factors)
        peak = max(float(t.abs().amax()) for t in stored)
        if not holds(factor_dtype, peak):
            warnings.warn(
                f"loldu: layer '{layer.layer_name}' ({layer.base_layer.weight.dtype} weight "
                f"{tuple(layer.base_matrix().shape)}): its frozen factors reach max({self.peak_names}) = {peak:.3g}, "
                f"more than {factor_dtype} holds safely ({torch.finfo(factor_dtype).max / FACTOR_HEADROOM:.3g}); they "
                "are stored in float32", RuntimeWarning, stacklevel=stacklevel)
            factor_dtype = torch.float32
        self.peak = peak
        for keys in FACTOR_KEYS.values():
            for key in keys:
                layer._buffers.pop(key, None)
        for key, t in zip(self.keys, stored):
            layer.register_buffer(key, t.to(factor_dtype).contiguous(), persistent=False)
        layer.register_buffer("loldu_D", factors.D.to(d_dtype, copy=True), persistent=False)
        layer.register_buffer("loldu_pivots", factors.pivots.clone(), persistent=False)
        record_factor_source(layer)  # what they were derived from: save and merge refuse once W0 changes

    def dtype(self, layer) -> torch.dtype:
        """The dtype the factor buffers are stored in."""
        return layer._buffers[self.keys[0]].dtype

    def buffers(self, layer) -> Dict[str, torch.Tensor]:
        return {key: layer._buffers[key] for key in self.keys}

    def keep_held(self, layer, before: Dict[str, torch.Tensor]) -> None:
        """After a cast of the layer: if the new dtype cannot hold the factors (`holds`), they are
        `before` (the buffers before the cast) in fp32, moved like the rest."""
        if not all(holds(layer._buffers[key].dtype, self.peak) for key in before):
            for key, old in before.items():
                layer._buffers[key] = old.to(device=layer._buffers[key].device, dtype=torch.float32)

    def nbytes(self, layer) -> int:
        """Bytes the factor buffers, D and the pivots hold (factor_bytes, measured)."""
        keys = self.keys + ("loldu_D", "loldu_pivots")
        return sum(layer._buffers[k].numel() * layer._buffers[k].element_size() for k in keys)

    # -- the base and the branch ----------------------------------------------------------------
    def base_matrix(self, layer) -> torch.Tensor:
        """W0 as the (d, k) matrix LoLDU factorizes, a view of the base weight when possible."""
        return KINDS[layer.kind].matrix(layer.base_layer.weight)

    def base_output(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.base_layer(x)

    def adapted(self, layer, x: torch.Tensor, c: torch.Tensor, prec: Precision) -> torch.Tensor:
        """The layer's output with the adapter of coefficients c (laid out by the kind's c_rows when per row)."""
        return self.add_branch(layer, x, self.base_output(layer, x), c, prec)

    def add_branch(self, layer, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, prec: Precision) -> torch.Tensor:
        """y (the base output for x) plus the adapter branch; exactly y + 0 at c == 0."""
        raise NotImplementedError

    # -- the full factors -----------------------------------------------------------------------
    def full_factors(self, layer, reads: Optional[Reads] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(PL (d, r), U (r, k)) for merge and inspection; `reads`: what they are formed from where
        the store does not keep them (default: layer.factor_reads())."""
        raise NotImplementedError

    def delta(self, layer, c: torch.Tensor, reads: Optional[Reads] = None) -> torch.Tensor:
        """ΔW = PL diag(c) U through the delta_weight op (PL, U as full_factors forms them)."""
        raise NotImplementedError


class FullStore(FactorStore):
    """PL and U as the factorization gave them (in the factor dtype)."""

    name, keys, peak_names = "full", ("loldu_PL", "loldu_U"), "|PL|, |U|"

    @staticmethod
    def numbers(d, k, r):
        return d * r + r * k

    def pack(self, factors):
        return factors.PL, factors.U

    def full_factors(self, layer, reads=None):
        return layer.loldu_PL, layer.loldu_U

    def delta(self, layer, c, reads=None):
        return delta_weight(layer.loldu_PL, layer.loldu_U, c)

    def adapted(self, layer, x, c, prec):
        """A Linear-like kind computing natively runs the fused op: y = x W0^T + b + ((x U^T) c) PL^T
        in one call, in the form of the active adapter's config (layer.form)."""
        if KINDS[layer.kind].fused and not prec.fp32:
            PL, U = prec.factors(layer.loldu_PL, layer.loldu_U)
            return adapter_linear(x, layer.base_matrix(), layer.base_layer.bias, PL, U, c, form=layer.form())
        return super().adapted(layer, x, c, prec)

    def add_branch(self, layer, x, y, c, prec):
        """y + apply_out(apply_in(x, U) c, PL); in fp32 (the policy's fp32) cast to y's dtype once."""
        kind = KINDS[layer.kind]
        if kind.transposed:
            return self._add_lookup_branch(layer, kind, x, y, c, prec)
        cv = kind.c_channels(c, layer.rank)
        if prec.fp32:
            PL, U = wide(layer.loldu_PL), wide(layer.loldu_U)
            with prec.autocast_off():
                t = kind.apply_in(layer.base_layer, x.to(U.dtype), U)
                return y + kind.apply_out(t * cv.to(t.dtype), PL, PL.dtype).to(y.dtype)
        PL, U = prec.factors(layer.loldu_PL, layer.loldu_U)
        u = kind.apply_in(layer.base_layer, x, U)
        t = (u.to(cv.dtype) * cv).to(u.dtype)
        return y + kind.apply_out(t, PL, t.dtype)

    @staticmethod
    def _add_lookup_branch(layer, kind, ids, y, c, prec):
        """The transposed case: y + (PL[ids] c) U. c stays in its dtype through the scaling; the
        product with U runs in fp32 (the policy's fp32), else in the output's dtype."""
        t = kind.apply_in(layer.base_layer, ids, layer.loldu_PL).to(c.dtype) * c
        if prec.fp32:
            with prec.autocast_off():
                return y + kind.apply_out(t, layer.loldu_U, t.dtype).to(y.dtype)
        return y + kind.apply_out(t.to(y.dtype), layer.loldu_U, y.dtype).to(y.dtype)


class CurStore(FactorStore):
    """L11 and U11 only, never forming PL, U or a (d, k) matrix in the forward (docs/method.md §8):

        s = x W0[I, :]^T (the base output's channels I, less their bias),  t = s L11^{-T} D^{-1} (= x U^T),
        q = (t c) D^{-1} U11^{-T},  y + q W0[:, :r]^T (= y + (t c) PL^T).

    The base output holds s, so the branch costs one (n, r) x (r, d) product and two r x r triangular
    solves on the (n, r) rows (backward: the same, and the gradient through s joins the base's
    input gradient). Gradients flow to x and c only, as in the fused op. The solves run in the
    working dtype (fp32, fp64 for fp64). When the policy picks fp32, s is an fp32 product of x with
    the pivot rows instead (fp16 could overflow, §6) and the whole branch runs in fp32. Transposed
    (embedding): PL[ids] = W0[ids, :r] U11^{-1} D^{-1}, from the base output's first r columns, and
    (PL[ids] c) U = ((PL[ids] c) D^{-1} L11^{-1}) W0[I, :].
    """

    name, keys, peak_names = "cur", ("loldu_LU11",), "|L11|, |U11|"

    @staticmethod
    def numbers(d, k, r):
        return r * r

    def pack(self, factors):
        """L11 and U11 in one r x r matrix, the unit diagonal written exactly (the solves never read it)."""
        r = factors.D.shape[0]
        eye = torch.eye(r, dtype=factors.PL.dtype, device=factors.PL.device)
        return (factors.PL.index_select(0, factors.pivots.to(factors.PL.device)).tril(-1) + eye
                + factors.U[:, :r].triu(1),)

    @torch.no_grad()
    def full_factors(self, layer, reads=None):
        """Formed in the working dtype from W0 and the triangles: PL = W0[:, :r] U11^{-1} D^{-1} and
        U = D^{-1} L11^{-1} W0[I, :]."""
        wide_dt = working_dtype(layer.loldu_D.dtype)
        cols, rows = (t.to(layer.loldu_D.device, wide_dt) for t in (layer.factor_reads() if reads is None else reads))
        D = layer.loldu_D.to(wide_dt)
        L11 = U11 = layer.loldu_LU11.to(wide_dt)  # each solve reads its own triangle
        PL = torch.linalg.solve_triangular(U11, cols, upper=True, left=False, unitriangular=True) / D
        U = torch.linalg.solve_triangular(L11, rows, upper=False, unitriangular=True) / D[:, None]
        return PL, U

    def delta(self, layer, c, reads=None):
        PL, U = self.full_factors(layer, reads)
        return delta_weight(PL, U, c.to(PL.dtype))

    def add_branch(self, layer, x, y, c, prec):
        kind, base, r = KINDS[layer.kind], layer.base_layer, layer.rank
        W0 = layer.base_matrix().detach()
        wide_dt = working_dtype(layer.loldu_D.dtype)
        piv = layer.loldu_pivots.to(x.device)
        cv = kind.c_last(c, r).to(wide_dt)
        # What maps q to the output: W0[:, :r], or transposed the pivot rows W0[I, :].
        B = W0.index_select(0, piv) if kind.transposed else W0[:, :r]
        from_x = prec.fp32 and not kind.transposed  # a lookup's s is exact: read from y even then
        with prec.autocast_off() if from_x else contextlib.nullcontext():
            if from_x:
                s = kind.to_last(kind.apply_in(base, x.to(wide_dt), W0.index_select(0, piv).to(wide_dt)))
            else:
                s = kind.pivot_channels(base, y, piv, r)
            q = kind.from_last(self._solves(layer, s, cv, kind.transposed))
        with prec.autocast_off():
            if prec.fp32_weight if kind.transposed else prec.fp32:
                return y + kind.apply_out(q, B, wide_dt).to(y.dtype)
            return y + kind.apply_out(q.to(y.dtype), B, y.dtype)

    @staticmethod
    def _solves(layer, s: torch.Tensor, c: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The two r x r solves on the (..., r) rows of s, in the working dtype: t = s T1^{-1} D^{-1},
        then q = (t c) D^{-1} T2^{-1}, with T1, T2 the upper and lower unit triangles of M. M = LU11^T
        (T1 = L11^T, T2 = U11^T): t = x U^T from s = x W0[I, :]^T, and q W0[:, :r]^T = (t c) PL^T.
        Transposed, M = LU11 (T1 = U11, T2 = L11): t = PL[ids] from s = W0[ids, :r], and
        q W0[I, :] = (t c) U."""
        wide_dt = working_dtype(layer.loldu_D.dtype)
        LU = layer.loldu_LU11.to(wide_dt)  # one packed matrix: each solve reads its own triangle
        M = LU if transposed else LU.t()
        Dinv = 1.0 / layer.loldu_D.to(wide_dt)
        r = s.shape[-1]
        t = torch.linalg.solve_triangular(M, s.to(wide_dt).reshape(-1, r), upper=True, left=False, unitriangular=True)
        h = (t * Dinv).reshape(s.shape) * c
        q = torch.linalg.solve_triangular(M, (h * Dinv).reshape(-1, r), upper=False, left=False, unitriangular=True)
        return q.reshape(s.shape)


# Every factor storage by its name (LoLDUConfig.factor_storage). A new storage is one more store.
STORES: Dict[str, type] = {store.name: store for store in (FullStore, CurStore)}
FACTOR_KEYS: Dict[str, Tuple[str, ...]] = {name: store.keys for name, store in STORES.items()}


def make_store(storage: str, layer_name: str) -> FactorStore:
    """A new store of kind `storage` for the layer `layer_name` (AdapterError naming both if unknown)."""
    if storage not in STORES:
        raise AdapterError(f"layer '{layer_name}': factor_storage must be one of {list(FACTOR_KEYS)}, got {storage!r}")
    return STORES[storage]()


def factor_bytes(d: int, k: int, r: int, storage: str = "full", dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the frozen factors one adapted (d, k) layer keeps at rank r (docs/storage.md).

    storage: "full" (PL, U), "cur" (L11 and U11 packed in one r x r matrix), or "reference": the
    paper's released implementation, which keeps a dense (d, d) permutation matrix P, L (d, r) and
    U (r, k) in `dtype`. Every storage also keeps D (r,) in fp32 (fp64 for fp64) and, but for
    "reference", the pivots (r,) int64. The adapter itself (z, and sigma) is r + 1 numbers in every
    storage and is not counted.
    """
    names = list(STORES) + ["reference"]
    if storage not in names:
        raise AdapterError(f"factor_bytes: storage must be {', '.join(map(repr, names[:-1]))} or {names[-1]!r}, "
                           f"got {storage!r}")
    if not 1 <= r <= min(d, k):
        raise AdapterError(f"factor_bytes: rank {r} out of range for a ({d}, {k}) weight")
    elt = torch.empty((), dtype=dtype).element_size()
    d_bytes = r * torch.empty((), dtype=working_dtype(dtype)).element_size()
    if storage == "reference":
        return (d * d + d * r + r * k) * elt + d_bytes
    return STORES[storage].numbers(d, k, r) * elt + d_bytes + 8 * r
