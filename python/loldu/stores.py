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
- "lu" (full rank, Linear-like kinds): the packed LU of W0 in place of W0 in the base weight, and
  the row permutation perm (d,); the forward is loldu.ops.lu_linear (LuStore).
"""
import contextlib
import warnings
from typing import Dict, Optional, Tuple

import torch

from .errors import AdapterError
from .integrity import fingerprint, record_factor_source
from .kinds import KINDS
from .ldu import LDUResult
from .ops import adapter_linear, delta_weight, lu_linear, working_dtype
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

    @staticmethod
    def index_bytes(d: int, r: int) -> int:
        """Bytes of the int64 indices kept (the pivots)."""
        return 8 * r

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
        factor_dtype = self._held_dtype(layer, max(float(t.abs().amax()) for t in stored), factor_dtype, stacklevel)
        _drop_factor_buffers(layer)
        for key, t in zip(self.keys, stored):
            layer.register_buffer(key, t.to(factor_dtype).contiguous(), persistent=False)
        layer.register_buffer("loldu_D", factors.D.to(d_dtype, copy=True), persistent=False)
        layer.register_buffer("loldu_pivots", factors.pivots.clone(), persistent=False)
        record_factor_source(layer)  # what they were derived from: save and merge refuse once W0 changes

    def _held_dtype(self, layer, peak: float, factor_dtype: torch.dtype, stacklevel: int) -> torch.dtype:
        """`factor_dtype`, or fp32 (with a warning naming the layer) when it cannot hold factors whose
        largest magnitude is `peak` (`holds`); remembers `peak` for later casts."""
        if not holds(factor_dtype, peak):
            warnings.warn(
                f"loldu: layer '{layer.layer_name}' ({layer.base_layer.weight.dtype} weight "
                f"{tuple(layer.base_matrix().shape)}): its frozen factors reach max({self.peak_names}) = {peak:.3g}, "
                f"more than {factor_dtype} holds safely ({torch.finfo(factor_dtype).max / FACTOR_HEADROOM:.3g}); they "
                "are stored in float32", RuntimeWarning, stacklevel=stacklevel + 1)
            factor_dtype = torch.float32
        self.peak = peak
        return factor_dtype

    def dtype(self, layer) -> torch.dtype:
        """The dtype the factor buffers are stored in."""
        return layer._buffers[self.keys[0]].dtype

    def buffers(self, layer) -> Dict[str, torch.Tensor]:
        return {key: layer._buffers[key] for key in self.keys}

    def keep_held(self, layer, before: Dict[str, torch.Tensor], fn=None) -> None:
        """After a cast of the layer (`fn`, as Module._apply got it): if the new dtype cannot hold the
        factors (`holds`), they are `before` (the buffers before the cast) in fp32, moved like the rest."""
        if not all(holds(layer._buffers[key].dtype, self.peak) for key in before):
            for key, old in before.items():
                layer._buffers[key] = old.to(device=layer._buffers[key].device, dtype=torch.float32)

    # -- the base weight ------------------------------------------------------------------------
    # A store that keeps W0 in another form ("lu") replaces the weight's data; the others leave it.
    owns_weight = False

    def install(self, layer) -> None:
        """Puts what the store keeps in place of W0 into the base weight (once its first adapter is added)."""

    def base_dtype(self, layer) -> torch.dtype:
        """The dtype of W0 as the model holds it (the precision policy's weight dtype)."""
        return layer.base_layer.weight.dtype

    def release(self, layer) -> Optional[LDUResult]:
        """Before the layer changes store: puts W0 back in the weight if the store replaced it and
        returns the factors it holds exactly, or None (they are derived again from W0)."""
        return None

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


class _LuGuard:
    """Forward pre-hook of a base module while its weight holds the packed LU: its own forward would
    compute x LU^T, so it refuses to run. Removed whenever the weight gets W0 or W(c) back (merge, a
    change of storage, unload). A class, not a closure: deep copies of a model name their own layer."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module, args):
        raise AdapterError(
            f"layer '{self.name}': its base module's weight holds the packed LU of W0 (factor_storage='lu'), not "
            "W0, so the module cannot run on its own; run it through its LoLDU layer, or give W0 back first "
            "(loldu.merge_and_unload, or loldu.unload)")


def _guard(layer, on: bool) -> None:
    """Arms (on) or removes the _LuGuard of the layer's base module."""
    hooks = layer.base_layer._forward_pre_hooks
    for key in [key for key, hook in hooks.items() if isinstance(hook, _LuGuard)]:
        del hooks[key]
    if on:
        layer.base_layer.register_forward_pre_hook(_LuGuard(layer.layer_name))


def lu_refusal(kind: str, shape: Tuple[int, int], r: int) -> Optional[str]:
    """Why a (d, k) layer of `kind` at rank r cannot keep factor_storage="lu", or None."""
    if not KINDS[kind].fused:
        return (f"factor_storage='lu' keeps the packed LU in place of the weight, which only nn.Linear and "
                f"transformers Conv1D layers compute from; this {KINDS[kind].label} (weight {tuple(shape)}) needs "
                "'full' or 'cur'")
    if r != min(shape):
        return (f"factor_storage='lu' is exact only at full rank: rank must be min(d, k) = {min(shape)} for its "
                f"weight {tuple(shape)}, got rank {r} (use 'full' or 'cur' below full rank)")
    return None


class LuStore(FactorStore):
    """Full rank only, Linear-like kinds: the packed LU of W0 in place of W0 (docs/storage.md).

    At r = m = min(d, k) the factorization is exact, W0[perm] = L diag(D) Ũ, and the adapted weight
    is W(c)[perm] = L diag(D + c) Ũ (docs/method.md §1 at full rank; Shi et al., arXiv 2410.13618).
    The base weight's data becomes the (d, k) getrf layout: L (unit lower-trapezoidal) strictly
    below the diagonal, diag(D) Ũ on and above it (a Conv1D weight: its transpose, as W0 was); the
    same Parameter, so optimizers and state_dict see one weight. Buffers: perm (d,) int64, the only
    persistent one (state_dict marks an LU with it), D (m,) and the pivots perm[:m]. The forward is
    loldu.ops.lu_linear, two triangular products: the flops and the memory of the frozen layer.
    base_matrix() is the packed LU (W0 itself is not kept); the store remembers W0's dtype and
    fingerprint (taken before the LU replaced it) for adapter files, and recomputes W0 = P L D Ũ
    (within the LU's rounding) where W0 must come back: a change of storage, unload.
    """

    name, keys, peak_names = "lu", ("loldu_perm",), "|L|, |D Ũ|"
    owns_weight = True

    def __init__(self):
        super().__init__()
        self.pending: Optional[torch.Tensor] = None  # the LU from set_factors until install
        self.w0_dtype: Optional[torch.dtype] = None

    @staticmethod
    def numbers(d, k, r):
        return 0  # the LU takes W0's own place

    @staticmethod
    def index_bytes(d: int, r: int) -> int:
        return 8 * (d + r)  # perm and the pivots

    def pack(self, factors):
        """(LU (d, k), perm (d,)) in the factors' dtype: perm = the pivots, then the other rows in order."""
        PL, D, U, piv = factors
        d, m = PL.shape
        rest = torch.ones(d, dtype=torch.bool, device=PL.device)
        rest[piv] = False
        perm = torch.cat([piv, torch.arange(d, device=PL.device)[rest]])
        LU = torch.zeros(d, U.shape[1], dtype=PL.dtype, device=PL.device)
        LU[:m] = (D[:, None] * U).triu()
        LU[:, :m] += PL.index_select(0, perm).tril(-1)
        return LU, perm

    def set_factors(self, layer, factors, factor_dtype, d_dtype, stacklevel):
        """Packs the factors (refused below full rank, or for a kind that is not Linear-like); the
        weight keeps W0 until `install`, so a refusal elsewhere leaves the model unchanged."""
        d, k = factors.PL.shape[0], factors.U.shape[1]
        why = lu_refusal(layer.kind, (d, k), factors.D.shape[0])
        if why is not None:
            raise AdapterError(f"layer '{layer.layer_name}': {why}")
        LU, perm = self.pack(factors)
        factor_dtype = self._held_dtype(layer, float(LU.abs().amax()), factor_dtype, stacklevel)
        _drop_factor_buffers(layer)
        layer.register_buffer("loldu_perm", perm)
        layer.register_buffer("loldu_D", factors.D.to(d_dtype, copy=True), persistent=False)
        layer.register_buffer("loldu_pivots", factors.pivots.clone(), persistent=False)
        self.pending = LU.to(factor_dtype)

    @torch.no_grad()
    def install(self, layer):
        """The LU replaces W0's data (after W0's dtype and fingerprint are recorded); a guard keeps the
        base module's own forward from running on it."""
        if self.pending is None:
            return
        w = layer.base_layer.weight
        self.w0_dtype = w.dtype
        layer.w0_fingerprint = fingerprint(KINDS[layer.kind].matrix(w.detach()), layer.loldu_pivots)
        w.data = KINDS[layer.kind].weight(self.pending.to(w.device), w)
        self.pending = None
        _guard(layer, True)
        record_factor_source(layer)  # of the LU: an in-place edit of it makes the factors stale

    def dtype(self, layer):
        return self.lu(layer).dtype

    def base_dtype(self, layer):
        return self.w0_dtype or layer.base_layer.weight.dtype

    def lu(self, layer) -> torch.Tensor:
        """The packed LU (d, k): the weight's (d, k) view, or while merged the buffer that keeps it."""
        kept = layer._buffers.get("loldu_LU")
        return KINDS[layer.kind].matrix(layer.base_layer.weight) if kept is None else kept

    def base_matrix(self, layer):
        return self.lu(layer)

    def buffers(self, layer):
        return {"lu": self.lu(layer).detach()}

    def keep_held(self, layer, before, fn=None):
        """After a cast: W0's dtype follows it; an LU the new dtype cannot hold (`holds`) is `before`'s in fp32."""
        w = layer.base_layer.weight
        if fn is not None and self.w0_dtype is not None:
            self.w0_dtype = fn(torch.empty(0, dtype=self.w0_dtype, device=w.device)).dtype
        now = self.lu(layer)
        if not holds(now.dtype, self.peak):
            self._put_lu(layer, before["lu"].to(device=now.device, dtype=torch.float32))

    def _put_lu(self, layer, LU: torch.Tensor) -> None:
        if "loldu_LU" in layer._buffers:
            layer._buffers["loldu_LU"] = LU
        else:
            layer.base_layer.weight.data = KINDS[layer.kind].weight(LU, layer.base_layer.weight)

    # -- the forward ----------------------------------------------------------------------------
    def base_output(self, layer, x):
        if "loldu_LU" in layer._buffers:  # merged: the weight holds W(c)
            return layer.base_layer(x)
        prec = Precision(self.base_dtype(layer), x)
        return self.adapted(layer, x, torch.zeros_like(layer.loldu_D, dtype=working_dtype(layer.loldu_D.dtype)), prec)

    def adapted(self, layer, x, c, prec):
        """lu_linear in the policy's compute dtype (fp16 compute: the op's fp32 products on an fp16 LU,
        else fp32 throughout); per-row c through the triangles (the op takes one c)."""
        LU = self.lu(layer).detach()
        cd = prec.compute if not (prec.fp32 and LU.dtype != torch.float16) else working_dtype(LU.dtype)
        wd = working_dtype(cd)
        b = layer.base_layer.bias
        b = None if b is None else b.detach().to(cd)
        with prec.autocast_off():
            if c.dim() > 1:
                y = self._per_row(layer, x.to(cd), LU.to(cd), c.to(wd), b)
            else:
                y = lu_linear(x.to(cd), LU.to(cd), layer.loldu_perm, layer.loldu_D.to(wd), c.to(wd), b)
        return y.to(prec.compute)

    def _per_row(self, layer, x, LU, c, bias):
        """y = x W(c_row)^T + b with one c per row: u = x U^T, y[:, perm] = (u (1 + c / D)) L^T."""
        L, Up = _triangles(LU)
        d, k = LU.shape
        m = Up.shape[0]
        u = x.reshape(-1, k) @ Up.t()
        yP = (u * (1 + c.reshape(-1, m) / layer.loldu_D.to(c.dtype)).to(u.dtype)) @ L.t()
        y = yP.index_select(1, torch.argsort(layer.loldu_perm))
        return (y if bias is None else y + bias).view(*x.shape[:-1], d)

    def add_branch(self, layer, x, y, c, prec):  # pragma: no cover - adapted runs the whole layer
        raise NotImplementedError

    # -- W0, W(c) and the full factors ----------------------------------------------------------
    @torch.no_grad()
    def weight_of(self, layer, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W(c) = P L diag(D + c) Ũ (W0 at c = None), (d, k) in the working dtype."""
        wd = working_dtype(layer.loldu_D.dtype)
        L, Up = _triangles(self.lu(layer).to(wd))
        if c is not None:
            L = L * (1 + c.to(wd) / layer.loldu_D.to(wd))
        return (L @ Up).index_select(0, torch.argsort(layer.loldu_perm))

    @torch.no_grad()
    def full_factors(self, layer, reads=None):
        """PL (d, m) and U = Ũ (m, k) from the LU, in the working dtype (exact: no solve)."""
        wd = working_dtype(layer.loldu_D.dtype)
        L, Up = _triangles(self.lu(layer).to(wd))
        PL = torch.empty_like(L).index_copy_(0, layer.loldu_perm, L)
        return PL, Up / layer.loldu_D.to(wd)[:, None]

    def delta(self, layer, c, reads=None):
        PL, U = self.full_factors(layer)
        return delta_weight(PL, U, c.to(PL.dtype))

    @torch.no_grad()
    def merge(self, layer, c: torch.Tensor) -> None:
        """The weight gets W(c) in W0's dtype; the LU waits in the buffer loldu_LU for unmerge."""
        w = layer.base_layer.weight
        merged = self.weight_of(layer, c).to(self.base_dtype(layer))
        layer.register_buffer("loldu_LU", self.lu(layer).detach(), persistent=False)
        w.data = KINDS[layer.kind].weight(merged, w).contiguous()
        _guard(layer, False)

    @torch.no_grad()
    def unmerge(self, layer) -> None:
        w = layer.base_layer.weight
        w.data = KINDS[layer.kind].weight(layer._buffers.pop("loldu_LU"), w)
        _guard(layer, True)

    @torch.no_grad()
    def release(self, layer):
        """W0 = P L D Ũ back into the weight, in its dtype, and the exact factors of the LU."""
        PL, U = self.full_factors(layer)
        factors = LDUResult(PL, layer.loldu_D.clone(), U, layer.loldu_pivots.clone())
        w = layer.base_layer.weight
        w.data = KINDS[layer.kind].weight(self.weight_of(layer).to(self.base_dtype(layer)), w).contiguous()
        self.w0_dtype = None
        _guard(layer, False)
        return factors


def _triangles(LU: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L (d, m) unit lower, diag(D) Ũ (m, k) upper) of a packed (d, k) LU, as copies."""
    d, k = LU.shape
    m = min(d, k)
    return LU[:, :m].tril(-1) + torch.eye(d, m, dtype=LU.dtype, device=LU.device), LU[:m].triu()


def _drop_factor_buffers(layer) -> None:
    """Removes every store's factor buffers from the layer (a new store's go in their place)."""
    for keys in FACTOR_KEYS.values():
        for key in keys:
            layer._buffers.pop(key, None)


# Every factor storage by its name (LoLDUConfig.factor_storage). A new storage is one more store.
STORES: Dict[str, type] = {store.name: store for store in (FullStore, CurStore, LuStore)}
FACTOR_KEYS: Dict[str, Tuple[str, ...]] = {name: store.keys for name, store in STORES.items()}


def make_store(storage: str, layer_name: str, base=None) -> FactorStore:
    """A new store of kind `storage` for the layer `layer_name` (AdapterError naming both if unknown);
    for a `base` module whose weight is sharded (FSDP2), its sharded variant (loldu.distributed)."""
    if storage not in STORES:
        raise AdapterError(f"layer '{layer_name}': factor_storage must be one of {list(FACTOR_KEYS)}, got {storage!r}")
    from .distributed import is_sharded, sharded_store
    if base is not None and is_sharded(getattr(base, "weight", None)):
        return sharded_store(STORES[storage])()
    return STORES[storage]()


def factor_bytes(d: int, k: int, r: int, storage: str = "full", dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the frozen factors one adapted (d, k) layer keeps at rank r (docs/storage.md).

    storage: "full" (PL, U), "cur" (L11 and U11 packed in one r x r matrix), "lu" (full rank only:
    the packed LU takes W0's own place, so only perm (d,) int64 is counted besides D and the pivots), or "reference": the
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
    if storage == "lu" and r != min(d, k):
        raise AdapterError(f"factor_bytes: storage 'lu' is full rank only: r must be {min(d, k)} for a ({d}, {k}) weight")
    elt = torch.empty((), dtype=dtype).element_size()
    d_bytes = r * torch.empty((), dtype=working_dtype(dtype)).element_size()
    if storage == "reference":
        return (d * d + d * r + r * k) * elt + d_bytes
    return STORES[storage].numbers(d, k, r) * elt + d_bytes + STORES[storage].index_bytes(d, r)
