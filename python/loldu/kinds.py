"""The module kinds LoLDU adapts, and how each one's adapter branch meets its input and output.

A kind knows its module (how to recognize it, the (d, k) matrix W0 its weight is, why it cannot
be adapted) and three primitives the factor stores (loldu.stores) build every branch from:

- apply_in: an (r, k) matrix A applied to the input x, one output channel per row of A
  (linear: x A^T; conv2d: a conv with A as r filters). Embedding is the transposed case: its
  input selects rows of a (d, r) matrix (a lookup of PL rows by ids).
- apply_out: the (n, r) result mapped back to the output by a (d, r) matrix B (linear: t B^T;
  conv2d: a 1x1 conv), or, transposed, by an (r, k) matrix (embedding: t U).
- pivot_channels: x W0[I, :]^T read from the base output (channels I less their bias), with the
  channels last; transposed: W0[ids, :r], the output's first r columns (docs/method.md §8).

KINDS holds every kind by name; loldu.layer sets each one's `wrapper` (its LoLDU layer class).
"""
import sys
import warnings
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import LolduWarning


class LayerKind:
    """One supported module kind. label: how errors name it. wrapper: its LoLDU layer class.
    batched_dims: fewest dimensions of a batched input (batch dim 0), which loldu.adapter_ids needs.
    fused: the fused op `adapter_linear` computes base and branch in one call (Linear-like weights).
    transposed: the input selects rows of PL and the output is a product with U (a lookup).
    channel_dim: where the output's channels are."""

    name = ""
    label = ""
    wrapper: type = None  # set by loldu.layer
    batched_dims = 2
    fused = False
    transposed = False
    channel_dim = -1

    def is_kind(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The module's weight -> the (d, k) matrix LoLDU factorizes (a view when possible)."""
        return w

    def weight(self, M: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(matrix, the module's weight) -> the matrix laid out as that weight (matrix's inverse)."""
        return M

    def refuse(self, module: nn.Module) -> Optional[str]:
        """Why a module of this kind cannot be adapted after all, or None."""
        return None

    # -- the branch's primitives ------------------------------------------------------------------
    def apply_in(self, base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return x @ A.t()

    def apply_out(self, t: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t mapped to the output by B, cast to `dtype` (after it is laid out as the kind needs)."""
        return t @ B.to(dtype).t()

    def to_last(self, t: torch.Tensor) -> torch.Tensor:
        """apply_in's output with its r channels last (the triangular solves work on rows)."""
        return t

    def from_last(self, t: torch.Tensor) -> torch.Tensor:
        """to_last's inverse: channels-last (..., r) laid out as apply_out takes it."""
        return t

    def c_channels(self, c: torch.Tensor, r: int) -> torch.Tensor:
        """c, (r,) or per row, broadcast against apply_in's output."""
        return c

    def c_last(self, c: torch.Tensor, r: int) -> torch.Tensor:
        """c, (r,) or per row, broadcast against channels-last (..., r) rows."""
        return c

    def c_rows(self, c_rows: torch.Tensor, x: torch.Tensor, r: int) -> torch.Tensor:
        """The (rows, r) per-row c of loldu.adapter_ids laid out against the input x."""
        shape = (c_rows.shape[0],) + (1,) * (x.dim() - 2) + (r,)
        return c_rows.view(shape).expand(*x.shape[:-1], r)

    def pivot_channels(self, base: nn.Module, y: torch.Tensor, pivots: torch.Tensor, r: int) -> torch.Tensor:
        """s = x W0[I, :]^T, channels last, from the base output y = x W0^T + b: y's channels I less b[I]."""
        s = y.index_select(self.channel_dim, pivots)
        b = base.bias
        if b is not None:
            s = s - b.detach().index_select(0, pivots).to(s.dtype).view(-1, *(1,) * (-1 - self.channel_dim))
        return self.to_last(s)


class LinearKind(LayerKind):
    """nn.Linear: W0 = weight (out, in)."""

    name, label, fused = "linear", "nn.Linear", True

    def is_kind(self, module):
        return isinstance(module, nn.Linear)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style linear (weight stored (in, out)). Looked up lazily: a model holding
    one has imported transformers already, and `import loldu` should not pay for importing it."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(module, mod.Conv1D)


class Conv1DKind(LinearKind):
    """transformers Conv1D: weight stored (in, out), so W0 = weight^T (a view; the fused op accepts it)."""

    name, label = "conv1d", "transformers Conv1D"

    def is_kind(self, module):
        return _is_hf_conv1d(module)

    def matrix(self, w):
        return w.t()

    def weight(self, M, w):
        return M.t()


class EmbeddingKind(LayerKind):
    """nn.Embedding: W0 = weight (num, dim). The transposed case: ids select rows of PL (and of W0)."""

    name, label, batched_dims, transposed = "embedding", "nn.Embedding", 1, True

    def is_kind(self, module):
        return isinstance(module, nn.Embedding)

    def refuse(self, module):
        return None if module.max_norm is None else "Embedding with max_norm rewrites its weight in place; not supported"

    def apply_in(self, base, ids, A):
        return F.embedding(ids, A)

    def apply_out(self, t, B, dtype):
        return t @ B.to(dtype)

    def c_rows(self, c_rows, ids, r):
        return c_rows.view((c_rows.shape[0],) + (1,) * (ids.dim() - 1) + (r,))

    def pivot_channels(self, base, y, pivots, r):
        """W0[ids, :r], the base output's first r columns (what PL[ids] is solved from)."""
        return y[..., :r].detach()


class Conv2dKind(LayerKind):
    """nn.Conv2d: W0 = weight viewed (out, in*kh*kw). apply_in is a conv with r filters that shares the
    base conv's stride, padding (and padding mode) and dilation, so it sees exactly the patches the
    base conv sees; apply_out is a 1x1 conv."""

    name, label, batched_dims, channel_dim = "conv2d", "nn.Conv2d", 4, -3

    def is_kind(self, module):
        return isinstance(module, nn.Conv2d)

    def matrix(self, w):
        return w.reshape(w.shape[0], -1)

    def weight(self, M, w):
        return M.reshape(w.shape)

    def refuse(self, module):
        return None if module.groups == 1 else f"Conv2d with groups={module.groups} is not supported (only groups=1)"

    def apply_in(self, base, x, A):
        return base._conv_forward(x, A.reshape(A.shape[0], *base.weight.shape[1:]), None)

    def apply_out(self, t, B, dtype):
        return F.conv2d(t, B.reshape(B.shape[0], B.shape[1], 1, 1).to(dtype))

    def to_last(self, t):
        return t.movedim(-3, -1)

    def from_last(self, t):
        return t.movedim(-1, -3)

    def c_channels(self, c, r):
        return c.view(-1, r, 1, 1) if c.dim() == 2 else c.view(r, 1, 1)  # (r, 1, 1): also unbatched (C, H, W)

    def c_last(self, c, r):
        return c.view(-1, 1, 1, r) if c.dim() == 2 else c

    def c_rows(self, c_rows, x, r):
        return c_rows


# The floating-point weight dtypes LoLDU factorizes (float8 and smaller formats are refused by name).
FACTORIZED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Every module kind LoLDU adapts, by name (its wrapper's `kind`). A new kind is one more entry (and its wrapper).
KINDS: Dict[str, LayerKind] = {kind.name: kind for kind in (LinearKind(), Conv2dKind(), EmbeddingKind(), Conv1DKind())}


def kind_of(module: nn.Module) -> Optional[str]:
    """The kind (a key of KINDS) of a module LoLDU can wrap, or None."""
    return next((k for k, entry in KINDS.items() if entry.is_kind(module)), None)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (d, k) view of a supported module's weight that LoLDU factorizes (no copy when possible)."""
    return KINDS[kind_of(module)].matrix(module.weight)


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
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype not in FACTORIZED_DTYPES:
        return (f"its weight is {w.dtype}, which LoLDU cannot factorize (nor check for NaN/Inf): it adapts "
                f"{', '.join(str(t) for t in FACTORIZED_DTYPES)} weights; dequantize the module's weight first")
    return None


def batched_weights(root: nn.Module):
    """(parameter name, its module's class, shape, numel) of every weight no kind covers that holds a
    stack of matrices: a parameter of 3 or more dimensions of a module that is none of KINDS, such as
    the experts of a transformers 5 mixture of experts (MixtralExperts keeps gate_up_proj (E, 2f, h) and
    down_proj (E, h, f), one matrix per expert, instead of nn.Linear modules)."""
    found = []
    for mname, module in root.named_modules():
        if kind_of(module) is not None:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3 and p.is_floating_point():
                found.append((f"{mname}.{pname}" if mname else pname, type(module).__name__, tuple(p.shape), p.numel()))
    return found


def warn_batched_weights(root: nn.Module, what: str, stacklevel: int) -> None:
    """One warning when `what` (the target selection) leaves stacked weights (batched_weights) without an
    adapter: it names them and their share of the model's parameters, which then stay frozen."""
    found = batched_weights(root)
    if not found:
        return
    total = sum(p.numel() for p in root.parameters())
    skipped = sum(n for *_, n in found)
    classes = sorted({cls for _, cls, _, _ in found})
    examples = ", ".join(f"'{name}' {shape}" for name, _, shape, _ in found[:2])
    warnings.warn(f"loldu: {what} leaves out {len(found)} stacked weight tensors of {', '.join(classes)} "
                  f"({examples}, ...: mixture-of-experts experts, one matrix per expert, which are no module LoLDU "
                  f"adapts): {skipped:,} of the model's {total:,} parameters "
                  f"({100 * skipped / max(total, 1):.1f}%) get no adapter and stay frozen", LolduWarning,
                  stacklevel=stacklevel + 1)
