"""How one layer adapts: wrappers that hold the frozen factors and each adapter's (z, sigma).

    W(z, sigma) = W0 + PL diag(c) U   (docs/method.md §1)

with c from z and sigma as `coefficients_from` computes it: c = sigma z - sigma0 D in the paper's
parametrization, c = (sigma / sigma0) D z in the relative one (§9).

A layer is its kind (loldu.kinds: how the branch meets the module's input and output) times its
factor store (loldu.stores: which frozen factors it keeps and the branch computed from them) times
one precision policy (loldu.precision: the dtypes the branch runs in). This module keeps the
bookkeeping: adapters, coefficients, merge and unmerge, forward routing, and load_state_dict.

The base module is kept as `base_layer` (delta form), so disabling, several adapters and unloading
cost nothing; only an "lu" store replaces its weight's data, by the packed LU of W0 (restore_base
gives W0 back, within the LU's rounding). The frozen factors are non-persistent buffers (stores.FACTOR_KEYS, loldu_D,
loldu_pivots): they are re-derived from W0, so they stay out of `state_dict()` (which then holds
only the base weights and every adapter's z and sigma) but still follow `.to()` and DDP's buffer
broadcast. All adapters of one layer share them; each adapter adds r + 1 numbers.

The factors stay consistent with W0: `load_state_dict` of another base weight re-derives them,
`unmerge` restores exactly what the factorization reads, and a cast of the module never stores
them in a dtype that cannot hold them.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import LoLDUConfig
from .errors import AdapterError, FactorizationError
from .integrity import fingerprint, is_fresh, record_factor_source
from .kinds import KINDS, LayerKind, kind_of, weight_matrix, weight_refusal
from .ldu import LDUResult
from .ops import ldu, ldu_from_pivots, working_dtype
from .precision import Precision
from .stores import FACTOR_HEADROOM, FACTOR_KEYS, STORES, FactorStore, factor_bytes, holds, lu_refusal, make_store

__all__ = ["FACTOR_HEADROOM", "FACTOR_KEYS", "KINDS", "STORES", "FactorStore", "LayerKind", "LoLDUConv1D",
           "LoLDUConv2d", "LoLDUEmbedding", "LoLDULayer", "LoLDULinear", "check_supported", "coefficients_from",
           "factor_bytes", "holds", "kind_of", "weight_matrix", "weight_refusal"]


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
    factors, reads, W = loading
    if layer.store.owns_weight:  # the weight got the loaded W0 copied into the LU's tensor: W0 as loaded instead
        dtype, w = layer.store.dtype(layer), layer.base_layer.weight
        w.data = KINDS[layer.kind].weight(W, w)
        layer.store.set_factors(layer, factors, dtype, layer.loldu_D.dtype, stacklevel=4)
        layer.store.install(layer)
        return
    now = _reads(layer.base_matrix(), factors.pivots)
    if all(a.device == b.device and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(now, reads)):
        layer.store.set_factors(layer, factors, layer.store.dtype(layer), layer.loldu_D.dtype, stacklevel=4)
        layer.w0_fingerprint = None  # W0 is in the weight again


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
    """Base of the wrappers; a subclass names its kind (a key of KINDS).

    `store` (loldu.stores) keeps the frozen factors as buffers of this module: loldu_PL (d, r) and
    loldu_U (r, k) ("full"), or loldu_LU11 (r, r), the unit triangles L11 and U11 packed ("cur"), or
    at full rank the packed LU in the base weight itself and loldu_perm (d,) ("lu"), in
    the config's factor dtype, or fp32 where that dtype cannot hold them (`holds`); loldu_D (r,) and
    the pivots (r,) int64 as the factorization returned them (fp32, or fp64 for fp64 weights). The
    storage is the first adapter's factor_storage (every adapter of a layer shares its factors, so
    all must agree).
    Parameters: loldu_z[name] (r,) and loldu_sigma[name] () for every adapter `name`, in D's dtype
    (fp32; fp64 for fp64 weights), as is c: low-precision bases still get fp32 coefficients.
    """

    kind = ""

    def __init__(self, base_layer: nn.Module, factors: LDUResult, factor_dtype: torch.dtype, name: str = "",
                 storage: str = "full"):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name  # the wrapped module's name in the model, for errors and warnings
        self._factor_dtype_asked = factor_dtype  # the config's factor dtype (stored in fp32 if it cannot hold them)
        self.store: FactorStore = make_store(storage, name, base_layer)
        self.store.set_factors(self, factors, factor_dtype, factors.D.dtype, stacklevel=5)
        self.loldu_z = nn.ParameterDict()
        self.loldu_sigma = nn.ParameterDict()
        self.sigma0: Dict[str, float] = {}
        # sigma0 rounded to each dtype sigma may be stored in (after a user's model.to(dtype)).
        self._sigma0_as: Dict[str, Dict[torch.dtype, float]] = {}
        self.configs: Dict[str, LoLDUConfig] = {}
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
        self._loading: Optional[Tuple[LDUResult, Tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = None
        # (id of the state_dict, prefix, prepare_load's result) when the model's pre-hook checked it first.
        self._prepared: Optional[tuple] = None
        # The fingerprint of W0 (integrity.fingerprint) where the weight no longer holds W0 as it was
        # trained on ("lu" storage, or W0 recomputed from the LU); None: read from the weight.
        self.w0_fingerprint: Optional[bytes] = None
        self.register_load_state_dict_post_hook(_install_loaded_factors)

    # -- frozen factors -------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """The name of the factor store ("full", "cur" or "lu")."""
        return self.store.name

    @property
    def base_dtype(self) -> torch.dtype:
        """W0's dtype as the model holds it (an "lu" layer may keep its LU in fp32, `holds`)."""
        return self.store.base_dtype(self)

    def base_fingerprint(self) -> bytes:
        """integrity.fingerprint of W0 and the pivots: recorded before an "lu" store replaced W0, else read now."""
        return self.w0_fingerprint or fingerprint(self.base_matrix(), self.loldu_pivots)

    def restore_base(self) -> None:
        """Gives W0 back to the base weight where the store replaced it ("lu": W0 = P L D Ũ, recomputed
        within the LU's rounding), before the base module is put back (unload). A merged layer's
        weight already holds W(c) (merge_and_unload)."""
        if self.store.owns_weight and self.merged_adapter is None:
            self.store.release(self)

    @property
    def batched_dims(self) -> int:
        """Fewest dimensions of a batched input (batch dim 0), which loldu.adapter_ids needs."""
        return KINDS[self.kind].batched_dims

    def use_storage(self, storage: str) -> None:
        """Re-stores the frozen factors as `storage` (the first adapter's factor_storage; an export
        stores its copy's as "full"). The factors are derived again from W0 and the pivots
        (ldu_from_pivots: the same factors ldu gave)."""
        store = make_store(storage, self.layer_name, self.base_layer)
        if storage == self.storage:
            return
        if self.merged_adapter is not None:  # pragma: no cover - a merged layer has an adapter
            raise AdapterError(f"layer '{self.layer_name}' is merged; unmerge before changing factor_storage")
        if store.owns_weight:  # refused below full rank before anything changes
            why = lu_refusal(self.kind, tuple(self.base_matrix().shape), self.rank)
            if why is not None:
                raise AdapterError(f"layer '{self.layer_name}': {why}")
        factors = self.store.release(self)  # "lu": W0 back in the weight, and the LU's exact factors
        if factors is None:
            W = self.base_matrix().detach()
            try:
                factors = ldu_from_pivots(W, self.loldu_pivots.to(W.device))
            except FactorizationError as e:  # pragma: no cover - the same W0 was factorized at inject
                raise AdapterError(f"layer '{self.layer_name}': {e}") from None
        store.set_factors(self, factors, self._factor_dtype_asked, self.loldu_D.dtype, stacklevel=6)
        self.store = store
        if self.configs:
            store.install(self)

    def _apply(self, fn, recurse=True):
        """Casts and moves of the module (model.half(), .to(...)). A cast to a dtype that cannot hold
        the frozen factors (`holds`) keeps them (PL and U, or L11 and U11) in float32, moved like the
        rest; the parts of W0 remembered by merge follow the weight."""
        before = self.store.buffers(self)
        fresh = is_fresh(self)  # a cast of fresh factors stays fresh; stale ones stay stale
        super()._apply(fn, recurse)
        self.store.keep_held(self, before, fn)
        if self._merged_reads is not None:
            self._merged_reads = tuple(fn(t) for t in self._merged_reads)
        if fresh:
            record_factor_source(self)
        return self

    def _pivoting(self) -> str:
        return next(iter(self.configs.values())).pivoting if self.configs else "partial"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict reaches a module before its children, so this runs before the base weight
        # is loaded: a new base weight is factorized (or refused) here, while the layer is as it was,
        # and its factors are installed once it is loaded (_install_loaded_factors).
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[:2] == (id(state_dict), prefix):
            self._loading = prepared[2]  # checked and factorized before anything loaded (prepare_load)
        else:
            self._loading = self.prepare_load(state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        perm_key = prefix + "loldu_perm"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._loading is not None and perm_key in missing_keys:
            missing_keys.remove(perm_key)  # an "lu" layer loading W0: its perm is derived again

    def prepare_load(self, state_dict, prefix: str, assign: bool):
        """What load_state_dict will install for this layer (`_loading`): the factors of the incoming
        base weight, or None. Raises AdapterError when the layer cannot take the state_dict; the model's
        load_state_dict pre-hook (loldu.model) runs this for every layer before any module loads, so a
        refusal leaves the whole model as it was."""
        incoming, perm_key = state_dict.get(prefix + "base_layer.weight"), prefix + "loldu_perm"
        if perm_key in state_dict and isinstance(incoming, torch.Tensor):
            self._check_loaded_lu(incoming, state_dict[perm_key], perm_key)
            return None
        return self._factors_of_loaded(incoming, assign)

    def _check_loaded_lu(self, incoming: torch.Tensor, perm, perm_key: str) -> None:
        """A state_dict of an "lu" layer (perm_key marks it) holds the packed LU in its weight entry: it
        loads only into an "lu" layer holding that same LU (its own state_dict, or one of the same base)."""
        if not self.store.owns_weight:
            raise AdapterError(
                f"load_state_dict: layer '{self.layer_name}': the state_dict holds the packed LU of its base weight "
                f"(factor_storage='lu', marked by '{perm_key}'), not W0, but this layer stores {self.storage!r}; "
                "load it into a model injected with factor_storage='lu' (nothing was loaded into it)")
        w = self.base_layer.weight
        same = (incoming.shape == w.shape and torch.equal(incoming.detach().to(w.device, w.dtype), w.detach())
                and isinstance(perm, torch.Tensor) and torch.equal(perm.to(self.loldu_perm.device), self.loldu_perm))
        if not same:
            raise AdapterError(
                f"load_state_dict: layer '{self.layer_name}': the state_dict holds another packed LU for its weight "
                f"{tuple(self.base_matrix().shape)} (factor_storage='lu'); an LU loads only onto the base it was taken "
                "from. Load that base's W0 (a state_dict of the plain or 'full' model), which is factorized again, "
                "or inject again (nothing was loaded into it)")

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
        dev, dt = (incoming.device, incoming.dtype) if assign else (w.device, self.store.base_dtype(self))
        same_kind = not w.is_meta and (dev, dt) == (w.device, w.dtype)
        new = KINDS[self.kind].matrix(incoming.detach())
        if self.merged_adapter is not None:
            if same_kind and torch.equal(new.to(dev, dt), self.base_matrix()):
                return None
            raise AdapterError(
                f"load_state_dict: layer '{self.layer_name}' is merged (adapter {self.merged_adapter!r}) and the "
                "state_dict holds another base weight for it; call loldu.unmerge first (nothing was loaded into it)")
        if same_kind and is_fresh(self):  # stale factors are re-derived even from the weight they have
            now = _reads(self.base_matrix(), self.loldu_pivots)
            if all(torch.equal(a.to(dev, dt), b) for a, b in zip(_reads(new, self.loldu_pivots), now)):
                return None
        W = new.to(dev, dt)
        try:
            factors = ldu(W, self.rank, pivoting=self._pivoting())
        except FactorizationError as e:
            raise AdapterError(f"load_state_dict: layer '{self.layer_name}': the state_dict's base weight "
                               f"{tuple(W.shape)} cannot be factorized ({e}); nothing was loaded into it") from None
        return factors, _reads(W, factors.pivots), W

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
        """W0 as the (d, k) matrix LoLDU factorizes, as the store serves it (a view of the base weight)."""
        return self.store.base_matrix(self)

    def factor_reads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the factorization reads of W0, (W0[:, :r], W0[pivots, :]): while merged, as W0 was
        before the merge (remembered for unmerge), else read now."""
        if self._merged_reads is not None:
            return self._merged_reads
        W0 = self.base_matrix()
        return W0[:, :self.rank], W0.index_select(0, self.loldu_pivots.to(self.base_layer.weight.device))

    def add_adapter(self, name: str, config: LoLDUConfig, z: Optional[torch.Tensor] = None,
                    sigma: Optional[torch.Tensor] = None) -> None:
        """New adapter `name`: z (r,) and sigma () default to c == 0 exactly (z = D, or 0 in the relative
        parametrization; sigma = sigma0).

        The first adapter's factor_storage sets how the layer stores its frozen factors; a later
        adapter must ask for the same (AdapterError, the layer unchanged)."""
        storage = config.factor_storage
        if self.configs and storage != self.storage:
            raise AdapterError(f"layer '{self.layer_name}': adapter {name!r} asks for factor_storage={storage!r} but "
                               f"the layer's adapters share factors stored as {self.storage!r}")
        if not self.configs:
            self.use_storage(storage)  # raises (the layer unchanged) where the storage does not fit it
        sigma0 = config.scale_for(self.layer_name, self.rank)
        dev = self.loldu_D.device
        dt = working_dtype(self.loldu_D.dtype)
        if z is None:  # c == 0: z = D in the paper's form, z = 0 in the relative one
            z = torch.zeros_like(self.loldu_D) if config.parametrization == "relative" else self.loldu_D
        z0 = z.detach().to(dev, dt).clone()
        s0 = torch.tensor(sigma0, dtype=dt, device=dev) if sigma is None else sigma.detach().to(dev, dt).reshape(()).clone()
        self.loldu_z[name] = nn.Parameter(z0, requires_grad=False)
        self.loldu_sigma[name] = nn.Parameter(s0, requires_grad=False)
        self.sigma0[name] = sigma0
        self._sigma0_as[name] = {t: float(torch.tensor(sigma0, dtype=t))
                                 for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
        self.configs[name] = config
        self.store.install(self)  # "lu": the LU replaces W0 now that the layer joins the model

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
        """Adapter `name`'s c, (r,) in D's working dtype, as coefficients_from computes it in the
        config's parametrization.

        Exactly zero at initialisation (z == D, or 0 in the relative parametrization, and sigma ==
        sigma0 once sigma0 is rounded to sigma's storage dtype), in any evaluation order and even
        after the model was cast with .to(dtype), so the adapted model starts as the base model.
        """
        D = self.loldu_D
        dt = working_dtype(D.dtype)  # fp32 even if .to(bf16) was called
        z = self.loldu_z[name].to(dt)
        s = self.loldu_sigma[name]
        s0 = self._sigma0_as[name].get(s.dtype, self.sigma0[name])
        return coefficients_from(z, s.to(dt), D.to(dt), s0, self.configs[name].parametrization)

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
        return self.store.delta(self, self.coefficients(name))

    @torch.no_grad()
    def full_factors(self, reads: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """(PL (d, r), U (r, k)): the stored ones ("full"), or, for "cur" storage, formed in the working
        dtype (fp32, fp64 for fp64) from `reads` (default: factor_reads()) and the triangles
        (docs/method.md §8). For merge, inspection and export; the forward never forms them."""
        return self.store.full_factors(self, reads)

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 <- W0 + ΔW in fp32, cast back to the weight's dtype. Remembers c, and what the
        factorization reads of W0 (W0[:, :r] and W0[pivots, :], (d + k) r numbers), for unmerge."""
        if self.merged_adapter is not None:
            raise AdapterError(f"already merged adapter {self.merged_adapter!r}; unmerge first")
        c = self.coefficients(name).detach().clone()
        if self.store.owns_weight:  # "lu": the weight gets W(c), the store keeps the LU for unmerge
            self.store.merge(self, c)
            self.merged_adapter, self._merged_c = name, c
            return
        reads = _reads(self.base_matrix(), self.loldu_pivots)
        self._add_to_weight(self.store.delta(self, c, reads), +1)
        self.merged_adapter, self._merged_c, self._merged_reads = name, c, reads

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW with the c used at merge time. What the factorization (and an adapter file's
        fingerprint) reads, W0[:, :r] and W0[pivots, :], is restored exactly, so the frozen factors
        and saved adapters still fit the base; the rest of W returns within one rounding of its dtype."""
        if self.merged_adapter is None:
            return
        if self.store.owns_weight:  # "lu": the LU kept at merge goes back, exactly
            self.store.unmerge(self)
            self.merged_adapter, self._merged_c = None, None
            return
        c = self._merged_c.to(self.loldu_D.device)  # a plain attribute: .to(device) did not move it
        self._add_to_weight(self.store.delta(self, c, self._merged_reads), -1, restore=self._merged_reads)
        self.merged_adapter, self._merged_c, self._merged_reads = None, None, None

    @torch.no_grad()
    def merged_matrix(self, name: str) -> torch.Tensor:
        """The (d, k) matrix merge(name) would write, in the weight's dtype, without writing it: W0 + ΔW,
        or for "lu" W(c) = P L diag(D + c) Ũ in W0's dtype (its weight holds the LU, not W0)."""
        c = self.coefficients(name).detach()
        if self.store.owns_weight:
            return self.store.weight_of(self, c).to(self.base_dtype)
        delta = self.store.delta(self, c, self.factor_reads())
        return (self.base_matrix().to(delta.dtype) + delta).to(self.base_layer.weight.dtype)

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
            return self.store.base_output(self, x)
        if self._row_ids is not None:
            if x.dim() < self.batched_dims:
                raise AdapterError(f"loldu.adapter_ids needs batched input (batch dim 0); layer '{self.layer_name}' "
                                   f"got shape {tuple(x.shape)}")
            rows = self._row_ids.shape[0]
            if x.shape[0] != rows:
                raise AdapterError(
                    f"{self.kind} layer '{self.layer_name}' got a batch of {x.shape[0]} rows but loldu.adapter_ids gave "
                    f"{rows} ids (one per row of the batch; generate's beams or num_return_sequences multiply the rows)")
            return self.adapted(x, KINDS[self.kind].c_rows(self.row_coefficients(), x, self.rank))
        if self.active_adapter is None:
            return self.store.base_output(self, x)
        return self.adapted(x, self.coefficients(self.active_adapter))

    def adapted(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The output for x with the adapter of coefficients c: (r,), or per row as the kind's c_rows
        lays them out. The store computes it in the precision the policy picks for x (loldu.precision).
        The forward passes the active adapter's c; an export passes the c it chose."""
        return self.store.adapted(self, x, c, Precision(self.store.base_dtype(self), x))

    def form(self) -> str:
        """The form the fused op runs (docs/method.md §7): the active adapter's config.form. An explicit
        "delta" or "dense" there wins; "auto" is the cost model's choice, unless loldu.ops.forced_form
        (or LOLDU_ADAPTER_FORM) replaces it. Per-row c always runs the delta form."""
        config = self.configs.get(self.active_adapter)
        return "auto" if config is None else config.form

    def stored_factor_bytes(self) -> int:
        """Bytes the layer's frozen factor buffers (FACTOR_KEYS, D, pivots) hold (factor_bytes, measured)."""
        return self.store.nbytes(self)

    def train(self, mode: bool = True) -> "LoLDULayer":
        """Refuses to enter training under transformers' plain Trainer (which would save the whole model,
        under wrapped names from_pretrained misreads): Trainer calls model.train() before its first step.
        The walk up the callers runs only when transformers.trainer is imported; never in a forward."""
        if mode:
            import sys

            from .wrapper import _refuse_plain_trainer  # wrapper builds on the model editing above this module

            _refuse_plain_trainer(sys._getframe(1), depth=64)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, rank={self.rank}, storage={self.storage}, adapters={list(self.loldu_z.keys())}, "
                f"active={self.active_adapter!r}")


class LoLDULinear(LoLDULayer):
    """nn.Linear (W0 = weight, (out, in)): y = x W0^T + b + ((x U^T) c) PL^T, with "full" storage via
    the fused op in the form of the adapter's config (`form`); in fp16 compute, the base layer's own
    forward plus that branch in fp32 (loldu.precision)."""

    kind = "linear"


class LoLDUConv1D(LoLDULinear):
    """transformers Conv1D: weight stored (in, out), so W0 = weight^T (a view; the op accepts it)."""

    kind = "conv1d"


class LoLDUEmbedding(LoLDULayer):
    """nn.Embedding (W0 = weight, (num, dim)): y = W0[ids] + (PL[ids] * c) U. Always this delta form
    (a lookup reads n rows of W0; a dense W would cost d k per call): the config's `form` is not used."""

    kind = "embedding"


class LoLDUConv2d(LoLDULayer):
    """nn.Conv2d, W0 = weight viewed (out, in*kh*kw): base conv + 1x1 conv(PL) of (c * conv(U)), the U
    conv sharing the base conv's stride, padding and dilation (loldu.kinds). Always this delta form:
    the config's `form` is not used (it selects the fused linear op's form)."""

    kind = "conv2d"


for _wrapper in (LoLDULinear, LoLDUConv1D, LoLDUEmbedding, LoLDUConv2d):
    KINDS[_wrapper.kind].wrapper = _wrapper
del _wrapper
