"""How one layer adapts: wrappers that hold the frozen factors and each adapter's (z, sigma).

    W(z, sigma) = W0 + PL diag(c) U,    c = sigma * z - sigma0 * D   (docs/method.md §1)

The base module is kept untouched as `base_layer` (delta form), so disabling, several adapters and
unloading cost nothing. The frozen factors PL (d, r), U (r, k), D (r,) and the pivots (r,) are
non-persistent buffers: they are re-derived from W0, so they stay out of `state_dict()` (which then
holds only the base weights and every adapter's z and sigma) but still follow `.to()` and DDP's
buffer broadcast. All adapters of one layer share them; each adapter adds r + 1 numbers.
"""
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import AdapterError
from .ldu import LDUResult
from .ops import adapter_linear, autocast_enabled, delta_weight, working_dtype

# fp16 holds x U^T (and c-scaled products) safely only while the frozen factors stay small: a
# layer whose max |PL| * max |U| exceeds this keeps fp32 factors and runs its adapter branch in
# fp32 whenever it computes in fp16 (the base matmul stays fp16). Partial pivoting bounds |PL| by 1,
# and at small ranks |U| is O(1) on trained weights, so this only triggers on badly scaled columns
# or high ranks, where fp16 would overflow (65504) to Inf and Inf * 0 to NaN even at c == 0.
FP16_SAFE_GROWTH = 256.0

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


def coefficients_from(z: torch.Tensor, sigma: torch.Tensor, D: torch.Tensor, sigma0: float) -> torch.Tensor:
    """c = sigma z - sigma0 D, written as sigma0 (z - D) + (sigma - sigma0) z: exactly 0 at init."""
    return sigma0 * (z - D) + (sigma - sigma0) * z


class LoLDULayer(nn.Module):
    """Base of the wrappers. Subclasses implement `_adapted(x, c)` and `_c_view(c_rows, x)`.

    Buffers: loldu_PL (d, r) and loldu_U (r, k) in the config's factor dtype; loldu_D (r,) and the
    pivots (r,) int64 as the factorization returned them (fp32, or fp64 for fp64 weights).
    Parameters: loldu_z[name] (r,) and loldu_sigma[name] () for every adapter `name`, in D's dtype
    (fp32; fp64 for fp64 weights), as is c: low-precision bases still get fp32 coefficients.
    """

    kind = ""

    def __init__(self, base_layer: nn.Module, factors: LDUResult, factor_dtype: torch.dtype, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        # max |PL| * max |U|: how large the adapter branch's intermediate products can grow.
        self.growth = float(factors.PL.abs().amax() * factors.U.abs().amax())
        if (base_layer.weight.dtype == torch.float16 and self.growth > FP16_SAFE_GROWTH
                and factor_dtype in (torch.float16, torch.bfloat16)):
            warnings.warn(
                f"loldu: layer '{name}' (fp16 weight {tuple(weight_matrix(base_layer).shape)}): its frozen factors grow "
                f"to max|PL| * max|U| = {self.growth:.3g} > {FP16_SAFE_GROWTH:g}, which fp16 cannot hold safely; they are "
                "stored in float32 and its adapter branch runs in float32", RuntimeWarning, stacklevel=4)
            factor_dtype = torch.float32
        self.register_buffer("loldu_PL", factors.PL.to(factor_dtype).contiguous(), persistent=False)
        self.register_buffer("loldu_U", factors.U.to(factor_dtype).contiguous(), persistent=False)
        self.register_buffer("loldu_D", factors.D.clone(), persistent=False)
        self.register_buffer("loldu_pivots", factors.pivots.clone(), persistent=False)
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
        # Set by loldu.adapter_ids: per-row index into _row_names (len == number of rows), or None.
        self._row_ids: Optional[torch.Tensor] = None
        self._row_names: List[str] = []

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
        """New adapter `name`: z (r,) and sigma () default to D and sigma0, i.e. c == 0 exactly."""
        sigma0 = config.initial_scale
        dev = self.loldu_D.device
        dt = working_dtype(self.loldu_D.dtype)
        z0 = (self.loldu_D if z is None else z).detach().to(dev, dt).clone()
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
        return coefficients_from(z, s.to(dt), D.to(dt), s0)

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
        return delta_weight(self.loldu_PL, self.loldu_U, self.coefficients(name))

    # -- merge ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 <- W0 + ΔW in fp32, cast back to the weight's dtype. Remembers c for unmerge."""
        if self.merged_adapter is not None:
            raise AdapterError(f"already merged adapter {self.merged_adapter!r}; unmerge first")
        c = self.coefficients(name).detach().clone()
        self._add_to_weight(delta_weight(self.loldu_PL, self.loldu_U, c), +1)
        self.merged_adapter, self._merged_c = name, c

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW with the c used at merge time (exact up to one rounding of W's dtype)."""
        if self.merged_adapter is None:
            return
        c = self._merged_c.to(self.loldu_PL.device)  # a plain attribute: .to(device) did not move it
        self._add_to_weight(delta_weight(self.loldu_PL, self.loldu_U, c), -1)
        self.merged_adapter, self._merged_c = None, None

    def _add_to_weight(self, delta: torch.Tensor, sign: int) -> None:
        w = self.base_layer.weight
        new = (self.base_matrix().to(delta.dtype) + sign * delta).to(w.dtype)
        # Written back through the parameter itself: the (d, k) matrix may be a copy (channels_last conv).
        w.copy_(KINDS[self.kind].weight(new, w))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapter is not None:
            if self._row_ids is not None and self.merged_adapter is not None:
                raise AdapterError("per-row adapters (loldu.adapter_ids) cannot run on a merged layer; unmerge first")
            return self.base_layer(x)
        if self._row_ids is not None:
            rows = self._row_ids.shape[0]
            if x.shape[0] != rows:
                raise AdapterError(
                    f"{self.kind} layer got a batch of {x.shape[0]} rows but loldu.adapter_ids gave {rows} ids")
            return self._adapted(x, self._c_view(self.row_coefficients(), x))
        if self.active_adapter is None:
            return self.base_layer(x)
        return self._adapted(x, self.coefficients(self.active_adapter))

    def _factors_for(self, x: torch.Tensor):
        """PL, U in the dtype the computation runs in (autocast casts inside the op instead)."""
        if autocast_enabled(x.device.type):
            return self.loldu_PL, self.loldu_U
        dt = self.base_layer.weight.dtype
        return self.loldu_PL.to(dt), self.loldu_U.to(dt)

    def _fp32_branch(self, x: torch.Tensor) -> bool:
        """Whether the adapter branch must run in fp32: fp16 compute with large factors."""
        if self.growth <= FP16_SAFE_GROWTH:
            return False
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

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, adapters={list(self.loldu_z.keys())}, active={self.active_adapter!r}"


class LoLDULinear(LoLDULayer):
    """nn.Linear (W0 = weight, (out, in)): y = x W0^T + b + ((x U^T) c) PL^T via the fused op."""

    kind = "linear"

    def _adapted(self, x, c):
        if self._fp32_branch(x):
            return self._adapted_fp32(x, c)
        PL, U = self._factors_for(x)
        return adapter_linear(x, self.base_matrix(), self.base_layer.bias, PL, U, c)

    def _adapted_fp32(self, x, c):
        """The base layer's own fp16 forward plus the adapter branch in fp32 (exactly + 0 at c == 0)."""
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
    """nn.Embedding (W0 = weight, (num, dim)): y = W0[ids] + (PL[ids] * c) U."""

    kind = "embedding"

    def _adapted(self, ids, c):
        y = self.base_layer(ids)
        # c stays fp32 through the scaling; the product with U runs in the output's dtype.
        t = F.embedding(ids, self.loldu_PL).to(c.dtype) * c
        if self._fp32_branch(y):
            with torch.autocast(y.device.type, enabled=False):
                return y + (t @ self.loldu_U.to(t.dtype)).to(y.dtype)
        return y + (t.to(y.dtype) @ self.loldu_U.to(y.dtype)).to(y.dtype)

    def _c_view(self, c_rows, ids):
        shape = (c_rows.shape[0],) + (1,) * (ids.dim() - 1) + (self.rank,)
        return c_rows.view(shape)


class LoLDUConv2d(LoLDULayer):
    """nn.Conv2d, W0 = weight viewed (out, in*kh*kw): base conv + 1x1 conv(PL) of (c * conv(U)).

    The U branch is a conv with r filters U.view(r, in, kh, kw) sharing the base conv's stride,
    padding (and padding mode) and dilation, so it sees exactly the patches the base conv sees.
    """

    kind = "conv2d"

    def _adapted(self, x, c):
        base = self.base_layer
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
