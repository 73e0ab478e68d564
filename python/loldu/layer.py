"""How one layer adapts: wrappers that hold the frozen factors and each adapter's (z, sigma).

    W(z, sigma) = W0 + PL diag(c) U,    c = sigma * z - sigma0 * D   (docs/method.md §1)

The base module is kept untouched as `base_layer` (delta form), so disabling, several adapters and
unloading cost nothing. The frozen factors PL (d, r), U (r, k), D (r,) and the pivots (r,) are
non-persistent buffers (with factor_storage="cur", the two r x r triangles L11 and U11 in place of
PL and U, docs/method.md §8): they are re-derived from W0, so they stay out of `state_dict()` (which then
holds only the base weights and every adapter's z and sigma) but still follow `.to()` and DDP's
buffer broadcast. All adapters of one layer share them; each adapter adds r + 1 numbers.

The factors stay consistent with W0: `load_state_dict` of another base weight re-derives them,
`unmerge` restores exactly what the factorization reads, and a cast of the module never stores
them in a dtype that cannot hold them.
"""
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import AdapterError, FactorizationError
from .ldu import LDUResult
from .ops import adapter_linear, autocast_enabled, delta_weight, ldu, ldu_from_pivots, working_dtype

# A frozen factor is stored in a dtype only while max |PL| and max |U| stay below that dtype's
# largest value divided by this headroom (fp16: 256), so that the sums and products formed from the
# stored factors stay finite; otherwise it is kept in fp32 (docs/method.md §6). Partial pivoting
# bounds |PL| by 1, and at small ranks |U| is O(1) on trained weights, so only badly scaled columns
# or high ranks reach it. (The adapter branch itself runs in fp32 whenever a layer computes in fp16.)
FACTOR_HEADROOM = 256.0


# The frozen factor buffers of each factor_storage (docs/method.md §8): "full" keeps PL (d, r) and
# U (r, k); "cur" keeps the unit triangles L11 = PL[pivots] and U11 = U[:, :r] packed in one (r, r)
# matrix LU11 (L11 below the diagonal, U11 above it, ones on it: the triangular solves read one
# triangle each and assume the unit diagonal), and reads W0[:, :r] and W0[pivots, :] from the base
# weight itself. D and the pivots are kept by both.
FACTOR_KEYS = {"full": ("loldu_PL", "loldu_U"), "cur": ("loldu_LU11",)}


def factor_bytes(d: int, k: int, r: int, storage: str = "full", dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the frozen factors one adapted (d, k) layer keeps at rank r (docs/storage.md).

    storage: "full" (PL, U), "cur" (L11 and U11 packed in one r x r matrix), or "reference": the
    paper's released implementation, which keeps a dense (d, d) permutation matrix P, L (d, r) and
    U (r, k) in `dtype`. Every storage also keeps D (r,) in fp32 (fp64 for fp64) and, but for
    "reference", the pivots (r,) int64. The adapter itself (z, and sigma) is r + 1 numbers in every
    storage and is not counted.
    """
    if storage not in ("full", "cur", "reference"):
        raise AdapterError(f"factor_bytes: storage must be 'full', 'cur' or 'reference', got {storage!r}")
    if not 1 <= r <= min(d, k):
        raise AdapterError(f"factor_bytes: rank {r} out of range for a ({d}, {k}) weight")
    elt = torch.empty((), dtype=dtype).element_size()
    d_bytes = r * torch.empty((), dtype=working_dtype(dtype)).element_size()
    if storage == "reference":
        return (d * d + d * r + r * k) * elt + d_bytes
    pivots = 8 * r
    factors = d * r + r * k if storage == "full" else r * r
    return factors * elt + d_bytes + pivots


def holds(dtype: torch.dtype, peak: float) -> bool:
    """Whether factors whose largest magnitude is `peak` may be stored in `dtype` (FACTOR_HEADROOM)."""
    return not dtype.is_floating_point or peak <= torch.finfo(dtype).max / FACTOR_HEADROOM


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style linear (weight stored (in, out)). Looked up lazily: a model holding
    one has imported transformers already, and `import loldu` should not pay for importing it."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(module, mod.Conv1D)


@dataclass(frozen=True)
class LayerKind:
    """One supported module kind (the table KINDS, at the end of this file, holds them all).

    label: how errors name it. is_kind: whether a module is of this kind. wrapper: its LoLDU layer
    class. matrix: the module's weight -> the (d, k) matrix LoLDU factorizes (a view when possible).
    weight: (matrix, the module's weight) -> the matrix laid out as that weight (matrix's inverse).
    refuse: why a module of this kind cannot be adapted after all, or None.
    """

    label: str
    is_kind: Callable[[nn.Module], bool]
    wrapper: type
    matrix: Callable[[torch.Tensor], torch.Tensor] = lambda w: w
    weight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda M, w: M
    refuse: Callable[[nn.Module], Optional[str]] = lambda module: None


def kind_of(module: nn.Module) -> Optional[str]:
    """The kind (a key of KINDS) of a module LoLDU can wrap, or None."""
    return next((k for k, entry in KINDS.items() if entry.is_kind(module)), None)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (d, k) view of a supported module's weight that LoLDU factorizes (no copy when possible)."""
    return KINDS[kind_of(module)].matrix(module.weight)


def check_supported(name: str, module: nn.Module) -> str:
    """Returns the layer kind (a key of KINDS: 'linear', 'conv2d', 'embedding', 'conv1d') or raises AdapterError."""
    if isinstance(module, LoLDULayer):
        raise AdapterError(f"layer '{name}' is already a LoLDU layer")
    kind = kind_of(module)
    if kind is None:
        labels = [entry.label for entry in KINDS.values()]
        raise AdapterError(
            f"layer '{name}' is a {type(module).__name__}; LoLDU adapts {', '.join(labels[:-1])} and {labels[-1]} "
            "(check target_modules)")
    why = KINDS[kind].refuse(module) or weight_refusal(module)
    if why is not None:
        raise AdapterError(f"layer '{name}': {why}")
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise AdapterError(f"layer '{name}': weight must be a floating-point tensor, got "
                           f"{None if w is None else w.dtype}")
    return kind


def weight_refusal(module: nn.Module) -> Optional[str]:
    """Why LoLDU cannot adapt (or merge into) this module's weight, whatever its kind, or None.

    The weight must be a stored tensor with values: not recomputed on every forward (a
    parametrization, or the old hook-based weight_norm / spectral_norm: merge would write into a
    temporary, and change nothing), not a lazy module's uninitialized parameter, not on meta.
    """
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return (f"its weight is parametrized ({kinds}): it is recomputed from other parameters on every forward, so "
                "merge would write into a temporary and change nothing. Remove the parametrization first: "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') (keeps the current weight)")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == "weight":
            fix = "remove_weight_norm" if isinstance(hook, WeightNorm) else "remove_spectral_norm"
            return (f"its weight is recomputed on every forward by nn.utils.{fix[7:]} ({type(hook).__name__} hook), so "
                    f"merge would write into a temporary and change nothing. Remove it first: nn.utils.{fix}(module)")
    if "weight" not in module._parameters and "weight" not in module._buffers:
        return ("its weight is neither a parameter nor a buffer of the module (it is recomputed or set by hand), so "
                "merge would not write into the module's weight")
    w = module._parameters.get("weight", module._buffers.get("weight"))
    if isinstance(w, nn.parameter.UninitializedTensorMixin):
        return ("its weight is uninitialized (a lazy module): run one forward (or initialize it) before adapting it")
    if isinstance(w, torch.Tensor) and w.is_meta:
        return ("its weight is on the meta device, with no values to factorize: materialize and load the weights first "
                "(e.g. model.to_empty(device=...) then load_state_dict)")
    return None


def _reads(M: torch.Tensor, pivots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the factorization reads of the (d, k) matrix M (docs/method.md §2), as copies:
    M[:, :r] and M[pivots, :], r = len(pivots)."""
    return M[:, :pivots.shape[0]].clone(), M.index_select(0, pivots.to(M.device))


def _install_loaded_factors(layer: "LoLDULayer", incompatible_keys) -> None:
    """load_state_dict post-hook: installs the factors of the base weight just loaded (found by
    LoLDULayer._load_from_state_dict), in the dtypes of the factors they replace. The state_dict's
    z and sigma then apply to them, as they did to the factors of the model it was saved from."""
    loading, layer._loading = layer._loading, None
    if loading is None:
        return
    factors, reads = loading
    now = _reads(layer.base_matrix(), factors.pivots)
    if all(a.device == b.device and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(now, reads)):
        layer._set_factors(factors, layer._factor_dtype, layer.loldu_D.dtype, stacklevel=4)


def coefficients_from(z: torch.Tensor, sigma: torch.Tensor, D: torch.Tensor, sigma0: float,
                      parametrization: str = "paper") -> torch.Tensor:
    """The adapter's c, exactly 0 at init.

    "paper": c = sigma z - sigma0 D, written as sigma0 (z - D) + (sigma - sigma0) z (z starts at D).
    "relative": c = (sigma / sigma0) D z (z starts at 0; sigma / sigma0 is exactly 1 until sigma trains).
    """
    if parametrization == "relative":
        return (sigma / sigma0) * (D * z)
    return sigma0 * (z - D) + (sigma - sigma0) * z


class LoLDULayer(nn.Module):
    """Base of the wrappers. Subclasses implement `_adapted(x, c)` (and `_adapted_cur(x, c)` for
    factor_storage="cur") and `_c_view(c_rows, x)`.

    Buffers: loldu_PL (d, r) and loldu_U (r, k) ("full" storage), or loldu_LU11 (r, r), the unit
    triangles L11 and U11 packed ("cur" storage, FACTOR_KEYS), in the config's factor dtype, or fp32 where that
    dtype cannot hold them (`holds`); loldu_D (r,) and the pivots (r,) int64 as the factorization
    returned them (fp32, or fp64 for fp64 weights). The storage is the first adapter's
    factor_storage (every adapter of a layer shares its factors, so all must agree).
    Parameters: loldu_z[name] (r,) and loldu_sigma[name] () for every adapter `name`, in D's dtype
    (fp32; fp64 for fp64 weights), as is c: low-precision bases still get fp32 coefficients.
    """

    kind = ""
    # Fewest dimensions of a batched input (batch dim 0), which loldu.adapter_ids needs.
    batched_dims = 2

    def __init__(self, base_layer: nn.Module, factors: LDUResult, factor_dtype: torch.dtype, name: str = "",
                 storage: str = "full"):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name  # the wrapped module's name in the model, for errors and warnings
        self._factor_peak = 0.0  # largest magnitude of the stored factor buffers (FACTOR_KEYS)
        self._factor_dtype_asked = factor_dtype  # the config's factor dtype (stored in fp32 if it cannot hold them)
        self._check_storage(storage)
        self.storage = storage
        self._set_factors(factors, factor_dtype, factors.D.dtype, stacklevel=5)
        self.loldu_z = nn.ParameterDict()
        self.loldu_sigma = nn.ParameterDict()
        self.sigma0: Dict[str, float] = {}
        # sigma0 rounded to each dtype sigma may be stored in (after a user's model.to(dtype)).
        self._sigma0_as: Dict[str, Dict[torch.dtype, float]] = {}
        self.configs: Dict[str, object] = {}
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.merged_adapter: Optional[str] = None
        self._merged_c: Optional[torch.Tensor] = None
        # What the factorization reads of W0 (W0[:, :r], W0[pivots, :]), remembered by merge for unmerge.
        self._merged_reads: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # Set by loldu.adapter_ids: per-row index into _row_names (len == number of rows), or None.
        self._row_ids: Optional[torch.Tensor] = None
        self._row_names: List[str] = []
        # While load_state_dict runs: the factors of the base weight it brings (_load_from_state_dict).
        self._loading: Optional[Tuple[LDUResult, Tuple[torch.Tensor, torch.Tensor]]] = None
        self.register_load_state_dict_post_hook(_install_loaded_factors)

    # -- frozen factors -------------------------------------------------------------------------
    def _check_storage(self, storage: str) -> None:
        if storage not in FACTOR_KEYS:
            raise AdapterError(f"layer '{self.layer_name}': factor_storage must be one of {list(FACTOR_KEYS)}, "
                               f"got {storage!r}")

    @property
    def _factor_dtype(self) -> torch.dtype:
        """The dtype the frozen factor buffers are stored in."""
        return self._buffers[FACTOR_KEYS[self.storage][0]].dtype

    def _set_factors(self, factors: LDUResult, factor_dtype: torch.dtype, d_dtype: torch.dtype,
                     stacklevel: int) -> None:
        """Stores the factor buffers of the layer's storage (FACTOR_KEYS) in `factor_dtype` (in fp32,
        with a warning naming the layer, when that dtype cannot hold them), D in `d_dtype` and the pivots."""
        if self.storage == "full":
            stored = (factors.PL, factors.U)
        else:  # L11 and U11 in one r x r matrix, the unit diagonal written exactly (the solves never read it)
            r = factors.D.shape[0]
            eye = torch.eye(r, dtype=factors.PL.dtype, device=factors.PL.device)
            stored = (factors.PL.index_select(0, factors.pivots.to(factors.PL.device)).tril(-1) + eye
                      + factors.U[:, :r].triu(1),)
        peak = max(float(t.abs().amax()) for t in stored)
        if not holds(factor_dtype, peak):
            names = "|PL|, |U|" if self.storage == "full" else "|L11|, |U11|"
            warnings.warn(
                f"loldu: layer '{self.layer_name}' ({self.base_layer.weight.dtype} weight "
                f"{tuple(self.base_matrix().shape)}): its frozen factors reach max({names}) = {peak:.3g}, more than "
                f"{factor_dtype} holds safely ({torch.finfo(factor_dtype).max / FACTOR_HEADROOM:.3g}); they are stored "
                "in float32", RuntimeWarning, stacklevel=stacklevel)
            factor_dtype = torch.float32
        self._factor_peak = peak
        for other in FACTOR_KEYS.values():
            for key in other:
                self._buffers.pop(key, None)
        for key, t in zip(FACTOR_KEYS[self.storage], stored):
            self.register_buffer(key, t.to(factor_dtype).contiguous(), persistent=False)
        self.register_buffer("loldu_D", factors.D.to(d_dtype, copy=True), persistent=False)
        self.register_buffer("loldu_pivots", factors.pivots.clone(), persistent=False)

    def _use_storage(self, storage: str) -> None:
        """Re-stores the frozen factors as `storage` (the first adapter's factor_storage). The factors are
        derived again from W0 and the pivots (ldu_from_pivots: the same factors ldu gave)."""
        self._check_storage(storage)
        if storage == self.storage:
            return
        if self.merged_adapter is not None:  # pragma: no cover - a merged layer has an adapter
            raise AdapterError(f"layer '{self.layer_name}' is merged; unmerge before changing factor_storage")
        W = self.base_matrix().detach()
        try:
            factors = ldu_from_pivots(W, self.loldu_pivots.to(W.device))
        except FactorizationError as e:  # pragma: no cover - the same W0 was factorized at inject
            raise AdapterError(f"layer '{self.layer_name}': {e}") from None
        old = self.storage
        self.storage = storage
        try:
            self._set_factors(factors, self._factor_dtype_asked, self.loldu_D.dtype, stacklevel=6)
        except BaseException:  # pragma: no cover
            self.storage = old
            raise

    def _apply(self, fn, recurse=True):
        """Casts and moves of the module (model.half(), .to(...)). A cast to a dtype that cannot hold
        the frozen factors (`holds`) keeps them (PL and U, or L11 and U11) in float32, moved like the
        rest; the parts of W0 remembered by merge follow the weight."""
        before = {key: self._buffers[key] for key in FACTOR_KEYS[self.storage]}
        super()._apply(fn, recurse)
        if not all(holds(self._buffers[key].dtype, self._factor_peak) for key in before):
            for key, old in before.items():
                self._buffers[key] = old.to(device=self._buffers[key].device, dtype=torch.float32)
        if self._merged_reads is not None:
            self._merged_reads = tuple(fn(t) for t in self._merged_reads)
        return self

    def _pivoting(self) -> str:
        return next(iter(self.configs.values())).pivoting if self.configs else "partial"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict reaches a module before its children, so this runs before the base weight
        # is loaded: a new base weight is factorized (or refused) here, while the layer is as it was,
        # and its factors are installed once it is loaded (_install_loaded_factors).
        self._loading = self._factors_of_loaded(state_dict.get(prefix + "base_layer.weight"),
                                                local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _factors_of_loaded(self, incoming, assign: bool):
        """(factors, what they read) of the base weight `incoming` that load_state_dict is about to
        load, or None when it leaves what the factorization reads unchanged (or loads nothing here).

        Raises AdapterError, before anything is loaded into the layer, when the layer is merged and
        `incoming` differs from its weight, or when `incoming` cannot be factorized.
        """
        w = self.base_layer.weight
        if not isinstance(incoming, torch.Tensor) or incoming.shape != w.shape or incoming.is_meta:
            return None  # not in this state_dict, or a mismatch torch reports, or no values to factorize
        if w.is_meta and not assign:
            return None  # copying into a meta weight is a no-op (torch warns)
        # The weight after loading: `incoming` itself with assign=True, else `incoming` copied into w.
        dev, dt = (incoming.device, incoming.dtype) if assign else (w.device, w.dtype)
        same_kind = not w.is_meta and (dev, dt) == (w.device, w.dtype)
        new = KINDS[self.kind].matrix(incoming.detach())
        if self.merged_adapter is not None:
            if same_kind and torch.equal(new.to(dev, dt), self.base_matrix()):
                return None
            raise AdapterError(
                f"load_state_dict: layer '{self.layer_name}' is merged (adapter {self.merged_adapter!r}) and the "
                "state_dict holds another base weight for it; call loldu.unmerge first (nothing was loaded into it)")
        if same_kind:
            now = _reads(self.base_matrix(), self.loldu_pivots)
            if all(torch.equal(a.to(dev, dt), b) for a, b in zip(_reads(new, self.loldu_pivots), now)):
                return None
        W = new.to(dev, dt)
        try:
            factors = ldu(W, self.rank, pivoting=self._pivoting())
        except FactorizationError as e:
            raise AdapterError(f"load_state_dict: layer '{self.layer_name}': the state_dict's base weight "
                               f"{tuple(W.shape)} cannot be factorized ({e}); nothing was loaded into it") from None
        return factors, _reads(W, factors.pivots)

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.loldu_D.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight (unchanged unless merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def base_matrix(self) -> torch.Tensor:
        """W0 as the (d, k) matrix LoLDU factorizes, a view of the base weight."""
        return KINDS[self.kind].matrix(self.base_layer.weight)

    def add_adapter(self, name: str, config, z: Optional[torch.Tensor] = None,
                    sigma: Optional[torch.Tensor] = None) -> None:
        """New adapter `name`: z (r,) and sigma () default to c == 0 exactly (z = D, or 0 in the relative
        parametrization; sigma = sigma0).

        The first adapter's factor_storage sets how the layer stores its frozen factors; a later
        adapter must ask for the same (AdapterError, the layer unchanged)."""
        storage = getattr(config, "factor_storage", "full")
        if self.configs and storage != self.storage:
            raise AdapterError(f"layer '{self.layer_name}': adapter {name!r} asks for factor_storage={storage!r} but "
                               f"the layer's adapters share factors stored as {self.storage!r}")
        if not self.configs:
            self._use_storage(storage)
        sigma0 = config.initial_scale
        dev = self.loldu_D.device
        dt = working_dtype(self.loldu_D.dtype)
        if z is None:  # c == 0: z = D in the paper's form, z = 0 in the relative one
            z = torch.zeros_like(self.loldu_D) if getattr(config, "parametrization", "paper") == "relative" else self.loldu_D
        z0 = z.detach().to(dev, dt).clone()
        s0 = torch.tensor(sigma0, dtype=dt, device=dev) if sigma is None else sigma.detach().to(dev, dt).reshape(()).clone()
        self.loldu_z[name] = nn.Parameter(z0, requires_grad=False)
        self.loldu_sigma[name] = nn.Parameter(s0, requires_grad=False)
        self.sigma0[name] = sigma0
        self._sigma0_as[name] = {t: float(torch.tensor(sigma0, dtype=t))
                                 for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
        self.configs[name] = config

    def delete_adapter(self, name: str) -> None:
        del self.loldu_z[name]
        del self.loldu_sigma[name]
        del self.sigma0[name]
        del self._sigma0_as[name]
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_trainable(self, name: Optional[str]) -> None:
        """Only adapter `name`'s z (and sigma if its config trains it) require grad."""
        for n in self.loldu_z.keys():
            self.loldu_z[n].requires_grad_(n == name)
            self.loldu_sigma[n].requires_grad_(n == name and self.configs[n].train_scale)

    def coefficients(self, name: str) -> torch.Tensor:
        """c = sigma z - sigma0 D, (r,) in D's dtype, written as sigma0 (z - D) + (sigma - sigma0) z.

        Both terms are exactly zero at initialisation (z == D, and sigma == sigma0 once sigma0 is
        rounded to sigma's storage dtype), in any evaluation order and even after the model was cast
        with .to(dtype), so the adapted model starts as the base model.
        """
        D = self.loldu_D
        dt = working_dtype(D.dtype)  # fp32 even if .to(bf16) was called
        z = self.loldu_z[name].to(dt)
        s = self.loldu_sigma[name]
        s0 = self._sigma0_as[name].get(s.dtype, self.sigma0[name])
        return coefficients_from(z, s.to(dt), D.to(dt), s0, getattr(self.configs[name], "parametrization", "paper"))

    def row_coefficients(self) -> torch.Tensor:
        """(rows, r) in c's dtype: each row's adapter c; an index equal to len(_row_names) means 'no adapter'."""
        cs = [self.coefficients(n) for n in self._row_names]
        table = torch.stack(cs + [torch.zeros_like(cs[0])])
        return table[self._row_ids]

    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        """ΔW = PL diag(c) U of adapter `name` (default: active), fp32 (d, k) in W0's matrix view."""
        name = name or self.active_adapter
        if name not in self.loldu_z:
            raise AdapterError(f"layer has no adapter {name!r}")
        return self._delta(self.coefficients(name))

    def _delta(self, c: torch.Tensor, reads: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """ΔW = PL diag(c) U through the delta_weight op. With "cur" storage PL and U are formed for it
        from the triangles and `reads` (W0[:, :r], W0[pivots, :]; default: read from W0 now)."""
        if self.storage == "full":
            return delta_weight(self.loldu_PL, self.loldu_U, c)
        PL, U = self.full_factors(reads)
        return delta_weight(PL, U, c.to(PL.dtype))

    @torch.no_grad()
    def full_factors(self, reads: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """(PL (d, r), U (r, k)): the stored ones ("full"), or, for "cur" storage, formed in the working
        dtype (fp32, fp64 for fp64) from W0 and the triangles (docs/method.md §8):
        PL = W0[:, :r] U11^{-1} D^{-1} and U = D^{-1} L11^{-1} W0[I, :]. For merge and inspection; the
        forward never forms them."""
        if self.storage == "full":
            return self.loldu_PL, self.loldu_U
        wide = working_dtype(self.loldu_D.dtype)
        if reads is None:
            reads = (self._merged_reads if self._merged_reads is not None
                     else (self.base_matrix()[:, :self.rank], self.base_matrix().index_select(
                         0, self.loldu_pivots.to(self.base_layer.weight.device))))
        cols, rows = (t.to(self.loldu_D.device, wide) for t in reads)
        D = self.loldu_D.to(wide)
        L11 = U11 = self.loldu_LU11.to(wide)  # each solve reads its own triangle
        PL = torch.linalg.solve_triangular(U11, cols, upper=True, left=False, unitriangular=True) / D
        U = torch.linalg.solve_triangular(L11, rows, upper=False, unitriangular=True) / D[:, None]
        return PL, U

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 <- W0 + ΔW in fp32, cast back to the weight's dtype. Remembers c, and what the
        factorization reads of W0 (W0[:, :r] and W0[pivots, :], (d + k) r numbers), for unmerge."""
        if self.merged_adapter is not None:
            raise AdapterError(f"already merged adapter {self.merged_adapter!r}; unmerge first")
        c = self.coefficients(name).detach().clone()
        reads = _reads(self.base_matrix(), self.loldu_pivots)
        self._add_to_weight(self._delta(c, reads), +1)
        self.merged_adapter, self._merged_c, self._merged_reads = name, c, reads

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW with the c used at merge time. What the factorization (and an adapter file's
        fingerprint) reads, W0[:, :r] and W0[pivots, :], is restored exactly, so the frozen factors
        and saved adapters still fit the base; the rest of W returns within one rounding of its dtype."""
        if self.merged_adapter is None:
            return
        c = self._merged_c.to(self.loldu_D.device)  # a plain attribute: .to(device) did not move it
        self._add_to_weight(self._delta(c, self._merged_reads), -1, restore=self._merged_reads)
        self.merged_adapter, self._merged_c, self._merged_reads = None, None, None

    def _add_to_weight(self, delta: torch.Tensor, sign: int,
                       restore: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """W <- W + sign ΔW in ΔW's dtype, cast back; then `restore` (W[:, :r], W[pivots, :]) written exactly."""
        w = self.base_layer.weight
        new = (self.base_matrix().to(delta.dtype) + sign * delta).to(w.dtype)  # a new tensor, never a view of w
        if restore is not None:
            cols, rows = restore
            new[:, :cols.shape[1]] = cols.to(new.device)
            new[self.loldu_pivots.to(new.device)] = rows.to(new.device)
        # Written back through the parameter itself: the (d, k) matrix may be a copy (channels_last conv).
        w.copy_(KINDS[self.kind].weight(new, w))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapter is not None:
            if self._row_ids is not None and self.merged_adapter is not None:
                raise AdapterError("per-row adapters (loldu.adapter_ids) cannot run on a merged layer; unmerge first")
            return self.base_layer(x)
        if self._row_ids is not None:
            if x.dim() < self.batched_dims:
                raise AdapterError(f"loldu.adapter_ids needs batched input (batch dim 0); layer '{self.layer_name}' "
                                   f"got shape {tuple(x.shape)}")
            rows = self._row_ids.shape[0]
            if x.shape[0] != rows:
                raise AdapterError(
                    f"{self.kind} layer got a batch of {x.shape[0]} rows but loldu.adapter_ids gave {rows} ids")
            return self._adapted(x, self._c_view(self.row_coefficients(), x))
        if self.active_adapter is None:
            return self.base_layer(x)
        return self._adapted(x, self.coefficients(self.active_adapter))

    def _form(self) -> str:
        """The form the fused op runs (docs/method.md §7): the active adapter's config.form. An explicit
        "delta" or "dense" there wins; "auto" is the cost model's choice, unless LOLDU_ADAPTER_FORM
        (loldu.ops.FORM_OVERRIDE) replaces it. Per-row c always runs the delta form."""
        config = self.configs.get(self.active_adapter) if self.active_adapter is not None else None
        return getattr(config, "form", "auto")

    def _cur_triangles(self, dtype: torch.dtype):
        """L11 and U11 in `dtype` (one packed matrix: each solve reads its own triangle), D^{-1} (r,)."""
        LU = self.loldu_LU11.to(dtype)
        return LU, LU, 1.0 / self.loldu_D.to(dtype)

    def _cur_t(self, s: torch.Tensor) -> torch.Tensor:
        """t = x U^T from s = x W0[I, :]^T (..., r), as U^T = W0[I, :]^T L11^{-T} D^{-1} (docs/method.md §8):
        one triangular solve on the rows of s, in the working dtype."""
        wide = working_dtype(self.loldu_D.dtype)
        L11, _, Dinv = self._cur_triangles(wide)
        r = self.rank
        s2 = s.to(wide).reshape(-1, r)
        t = torch.linalg.solve_triangular(L11.t(), s2, upper=True, left=False, unitriangular=True)
        return (t * Dinv).reshape(s.shape)

    def _cur_q(self, h: torch.Tensor) -> torch.Tensor:
        """q with q W0[:, :r]^T = h PL^T, from h (..., r), as PL^T = D^{-1} U11^{-T} W0[:, :r]^T: one
        triangular solve on the rows of h, in the working dtype."""
        wide = working_dtype(self.loldu_D.dtype)
        _, U11, Dinv = self._cur_triangles(wide)
        r = self.rank
        h2 = (h.to(wide) * Dinv).reshape(-1, r)
        q = torch.linalg.solve_triangular(U11.t(), h2, upper=False, left=False, unitriangular=True)
        return q.reshape(h.shape)

    def _factors_for(self, x: torch.Tensor):
        """PL, U in the dtype the computation runs in (autocast casts inside the op instead)."""
        if autocast_enabled(x.device.type):
            return self.loldu_PL, self.loldu_U
        dt = self.base_layer.weight.dtype
        return self.loldu_PL.to(dt), self.loldu_U.to(dt)

    def _fp32_branch(self, x: torch.Tensor) -> bool:
        """Whether the adapter branch runs in fp32: whenever the layer computes in fp16 (an fp16 weight,
        or autocast to fp16), whose range (65504) x U^T can leave even with ordinary factors, and
        Inf * 0 is NaN even at c == 0 (docs/method.md §6). bf16 has fp32's range: the fused op runs."""
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if autocast_enabled(dev) else self.base_layer.weight.dtype
        return dt == torch.float16

    def _wide_factors(self):
        wide = working_dtype(self.loldu_PL.dtype)
        return self.loldu_PL.to(wide), self.loldu_U.to(wide)

    def _adapted(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _c_view(self, c_rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stored_factor_bytes(self) -> int:
        """Bytes the layer's frozen factor buffers (FACTOR_KEYS, D, pivots) hold (factor_bytes, measured)."""
        keys = FACTOR_KEYS[self.storage] + ("loldu_D", "loldu_pivots")
        return sum(self._buffers[k].numel() * self._buffers[k].element_size() for k in keys)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, rank={self.rank}, storage={self.storage}, adapters={list(self.loldu_z.keys())}, "
                f"active={self.active_adapter!r}")


class LoLDULinear(LoLDULayer):
    """nn.Linear (W0 = weight, (out, in)): y = x W0^T + b + ((x U^T) c) PL^T via the fused op, in the
    form of the adapter's config (`_form`); in fp16 compute, the base layer's own forward plus that
    branch in fp32 (_adapted_fp32). With "cur" storage, `_adapted_cur`."""

    kind = "linear"

    def _adapted(self, x, c):
        if self.storage == "cur":
            return self._adapted_cur(x, c)
        if self._fp32_branch(x):
            return self._adapted_fp32(x, c)
        PL, U = self._factors_for(x)
        return adapter_linear(x, self.base_matrix(), self.base_layer.bias, PL, U, c, form=self._form())

    def _adapted_cur(self, x, c):
        """"cur" storage (docs/method.md §8), never forming PL, U or a (d, k) matrix:

            y = x W0^T + b (the base layer's own forward),  s = y[..., I] - b[I] = x W0[I, :]^T,
            t = s L11^{-T} D^{-1} (= x U^T),  q = (t c) D^{-1} U11^{-T},  y + q W0[:, :r]^T (= y + (t c) PL^T).

        The base output holds s, so the branch costs one (n, r) x (r, d) GEMM and two r x r triangular
        solves on the (n, r) rows (backward: g W0[:, :r], the same solves, and the gradient through s
        joins the base's input-gradient GEMM). At c == 0 the branch adds an exact zero to the base
        layer's output. Gradients flow to x and c only, as in the fused op. The solves run in the
        working dtype (fp32, fp64 for fp64). In fp16 compute s is an fp32 product with the pivot rows
        instead (fp16 could overflow, §6), and the branch runs in fp32."""
        W0 = self.base_matrix().detach()
        r = self.rank
        piv = self.loldu_pivots.to(x.device)
        y = self.base_layer(x)
        if self._fp32_branch(x):
            wide = working_dtype(self.loldu_D.dtype)
            with torch.autocast(x.device.type, enabled=False):
                s = x.to(wide) @ W0.index_select(0, piv).to(wide).t()
                q = self._cur_q(self._cur_t(s) * c.to(wide))
                return y + (q @ W0[:, :r].to(wide).t()).to(y.dtype)
        s = y.index_select(-1, piv)
        b = self.base_layer.bias
        if b is not None:
            s = s - b.detach().index_select(0, piv).to(s.dtype)
        q = self._cur_q(self._cur_t(s) * c.to(working_dtype(self.loldu_D.dtype)))
        with torch.autocast(x.device.type, enabled=False):
            return y + F.linear(q.to(y.dtype), W0[:, :r].to(y.dtype))

    def _adapted_fp32(self, x, c):
        """The base layer's own fp16 forward plus the adapter branch in fp32, cast to fp16 once at the
        end (exactly + 0 at c == 0)."""
        y = self.base_layer(x)
        PL, U = self._wide_factors()
        with torch.autocast(x.device.type, enabled=False):
            t = x.to(U.dtype) @ U.t()
            return y + ((t * c.to(U.dtype)) @ PL.t()).to(y.dtype)

    def _c_view(self, c_rows, x):
        shape = (c_rows.shape[0],) + (1,) * (x.dim() - 2) + (self.rank,)
        return c_rows.view(shape).expand(*x.shape[:-1], self.rank)


class LoLDUConv1D(LoLDULinear):
    """transformers Conv1D: weight stored (in, out), so W0 = weight^T (a view; the op accepts it)."""

    kind = "conv1d"


class LoLDUEmbedding(LoLDULayer):
    """nn.Embedding (W0 = weight, (num, dim)): y = W0[ids] + (PL[ids] * c) U. Always this delta form
    (a lookup reads n rows of W0; a dense W would cost d k per call): the config's `form` is not used."""

    kind = "embedding"
    batched_dims = 1

    def _adapted(self, ids, c):
        if self.storage == "cur":
            return self._adapted_cur(ids, c)
        y = self.base_layer(ids)
        # c stays fp32 through the scaling; the product with U runs in fp32 when the layer computes
        # in fp16 (_fp32_branch), else in the output's dtype.
        t = F.embedding(ids, self.loldu_PL).to(c.dtype) * c
        if self._fp32_branch(y):
            with torch.autocast(y.device.type, enabled=False):
                return y + (t @ self.loldu_U.to(t.dtype)).to(y.dtype)
        return y + (t.to(y.dtype) @ self.loldu_U.to(y.dtype)).to(y.dtype)

    def _adapted_cur(self, ids, c):
        """"cur" storage (docs/method.md §8): PL[ids] = W0[ids, :r] U11^{-1} D^{-1}, read from the base
        output's first r columns, and (PL[ids] c) U = ((PL[ids] c) D^{-1} L11^{-1}) W0[I, :]: two r x r
        solves on the (n, r) rows and one (n, r) x (r, k) product with the pivot rows, in the working dtype."""
        y = self.base_layer(ids)
        W0 = self.base_matrix().detach()
        wide = working_dtype(self.loldu_D.dtype)
        L11, U11, Dinv = self._cur_triangles(wide)
        r = self.rank
        p = y[..., :r].detach().to(wide).reshape(-1, r)
        PLi = torch.linalg.solve_triangular(U11, p, upper=True, left=False, unitriangular=True) * Dinv
        h = (PLi.view(*ids.shape, r) * c.to(wide)) * Dinv
        v = torch.linalg.solve_triangular(L11, h.reshape(-1, r), upper=False, left=False, unitriangular=True)
        rows = W0.index_select(0, self.loldu_pivots.to(W0.device))
        with torch.autocast(y.device.type, enabled=False):
            if self._fp32_branch(y):
                return y + (v @ rows.to(wide)).view(y.shape).to(y.dtype)
            return y + (v.to(y.dtype) @ rows.to(y.dtype)).view(y.shape)

    def _c_view(self, c_rows, ids):
        shape = (c_rows.shape[0],) + (1,) * (ids.dim() - 1) + (self.rank,)
        return c_rows.view(shape)


class LoLDUConv2d(LoLDULayer):
    """nn.Conv2d, W0 = weight viewed (out, in*kh*kw): base conv + 1x1 conv(PL) of (c * conv(U)).

    The U branch is a conv with r filters U.view(r, in, kh, kw) sharing the base conv's stride,
    padding (and padding mode) and dilation, so it sees exactly the patches the base conv sees.
    Always this delta form: the config's `form` is not used (it selects the fused linear op's form).
    """

    kind = "conv2d"
    batched_dims = 4

    def _adapted(self, x, c):
        base = self.base_layer
        if self.storage == "cur":
            return self._adapted_cur(x, c)
        y = base(x)
        out_ch = base.weight.shape[0]
        cv = c.view(-1, self.rank, 1, 1) if c.dim() == 2 else c.view(self.rank, 1, 1)  # (r,1,1): also unbatched (C, H, W)
        if self._fp32_branch(x):
            PL, U = self._wide_factors()
            with torch.autocast(x.device.type, enabled=False):
                u = base._conv_forward(x.to(U.dtype), U.reshape(self.rank, *base.weight.shape[1:]), None)
                t = u * cv.to(u.dtype)
                return y + F.conv2d(t, PL.reshape(out_ch, self.rank, 1, 1)).to(y.dtype)
        PL, U = self._factors_for(x)
        u = base._conv_forward(x, U.reshape(self.rank, *base.weight.shape[1:]), None)
        t = (u.to(cv.dtype) * cv).to(u.dtype)
        return y + F.conv2d(t, PL.reshape(out_ch, self.rank, 1, 1).to(t.dtype))

    def _adapted_cur(self, x, c):
        """"cur" storage (docs/method.md §8): the base conv's output channels I (less their bias) are the
        conv with filters W0[I, :], so t = conv(x, U) = (those channels) L11^{-T} D^{-1} per pixel; then
        q = (t c) D^{-1} U11^{-T} and y = base + 1x1 conv(q, W0[:, :r]). Two r x r solves per pixel in
        the working dtype; no PL, U or (d, k) matrix is formed. In fp16 compute the channels come from
        an fp32 conv with the r pivot filters instead, and the branch runs in fp32."""
        base = self.base_layer
        W = base.weight.detach()
        wide = working_dtype(self.loldu_D.dtype)
        piv = self.loldu_pivots.to(x.device)
        r = self.rank
        cv = (c.view(-1, 1, 1, r) if c.dim() == 2 else c).to(wide)  # channels last below: (..., H, W, r)
        y = base(x)
        cols = self.base_matrix().detach()[:, :r].reshape(W.shape[0], r, 1, 1)
        if self._fp32_branch(x):
            with torch.autocast(x.device.type, enabled=False):
                s = base._conv_forward(x.to(wide), W.index_select(0, piv).to(wide), None).movedim(-3, -1)
                q = self._cur_q(self._cur_t(s) * cv).movedim(-1, -3)
                return y + F.conv2d(q, cols.to(wide)).to(y.dtype)
        s = y.index_select(-3, piv)
        if base.bias is not None:
            s = s - base.bias.detach().index_select(0, piv).to(s.dtype).view(-1, 1, 1)
        q = self._cur_q(self._cur_t(s.movedim(-3, -1)) * cv).movedim(-1, -3)
        with torch.autocast(x.device.type, enabled=False):
            return y + F.conv2d(q.to(y.dtype), cols.to(y.dtype))

    def _c_view(self, c_rows, x):
        return c_rows


def _conv2d_refusal(module: nn.Conv2d) -> Optional[str]:
    return None if module.groups == 1 else f"Conv2d with groups={module.groups} is not supported (only groups=1)"


def _embedding_refusal(module: nn.Embedding) -> Optional[str]:
    return None if module.max_norm is None else "Embedding with max_norm rewrites its weight in place; not supported"


# Every module kind LoLDU adapts, by its wrapper's `kind`. A new kind is one more entry (and its wrapper).
KINDS: Dict[str, LayerKind] = {entry.wrapper.kind: entry for entry in (
    LayerKind("nn.Linear", lambda m: isinstance(m, nn.Linear), LoLDULinear),
    LayerKind("nn.Conv2d", lambda m: isinstance(m, nn.Conv2d), LoLDUConv2d,
              matrix=lambda w: w.reshape(w.shape[0], -1), weight=lambda M, w: M.reshape(w.shape),
              refuse=_conv2d_refusal),
    LayerKind("nn.Embedding", lambda m: isinstance(m, nn.Embedding), LoLDUEmbedding, refuse=_embedding_refusal),
    LayerKind("transformers Conv1D", _is_hf_conv1d, LoLDUConv1D, matrix=lambda w: w.t(), weight=lambda M, w: M.t()),
)}
