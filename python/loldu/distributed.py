"""LoLDU on models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor parameters);
docs/distributed.md.

The order that scales is shard, then adapt: `loldu.inject` (and add_adapter, load_adapter) run on
every rank of a model whose target weights are already DTensors sharded on dim 0. Every verb is then
collective: all ranks call it, with the same arguments.

- Factorization: the leading-r LDU block reads only the panel W0[:, :r] and the r pivot rows
  (docs/method.md §1; Shi et al., arXiv 2410.13618). Each layer gathers exactly those, bit for bit
  ((d + k) r numbers; at full rank the whole weight, one layer at a time), factors them identically
  on every rank (the panel's partial-pivoting LU gives the pivots, PL and D; U = D^-1 L11^-1 W0[I, :]),
  and the layer is built and sharded before the next one is factored.
- Frozen factors: FSDP2 shards parameters and leaves buffers whole on every rank, so a sharded
  layer keeps its factors ("full": PL, U; "cur": the r x r triangles) as parameters with
  requires_grad=False, and the LoLDU layer gets its own `fully_shard` (same mesh, the base
  weight and the adapters' z and sigma left out): the factors are split on dim 0 like the weight
  and gathered around the layer's forward and backward. With "lu" the packed LU is written into the
  weight's own shards. D and the pivots (r numbers each) stay whole buffers.
- z and sigma (r + 1 numbers per layer) stay whole on every rank; their gradients are averaged
  over the ranks as they are accumulated (as FSDP2 averages the sharded gradients), so every rank
  takes the same optimizer step and keeps the same z.
- Outside a forward, code that reads or writes W0 (merge, unmerge, unload) gets one layer whole
  at a time (`whole`): its weight gathered into a plain tensor, its factors unsharded; what it
  wrote is copied back into the rank's rows. save_adapter reads only z, sigma, the pivots and the
  fingerprint taken at inject; `save_adapter` here writes from rank 0 only.
"""
import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import AdapterError, FactorizationError
from .integrity import fingerprint_reads
from .ldu import LDUResult, ldu, ldu_from_pivots

try:  # DTensor and fully_shard: torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = FSDPModule = None

__all__ = ["is_sharded", "is_sharded_layer", "factorize_sharded", "sharded_store", "shard_layer",
           "whole", "save_adapter", "rank_zero", "reshard", "settle", "fingerprint_any"]

_SYNCED = "_loldu_grad_synced"  # marks a z or sigma whose gradient is averaged over the ranks


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (a parameter FSDP2 or tensor parallelism sharded)."""
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded_layer(layer) -> bool:
    """Whether a LoLDU layer's base weight is sharded (at rest, outside a forward)."""
    return is_sharded(getattr(layer.base_layer, "_parameters", {}).get("weight"))


# -- where a rank's rows are ---------------------------------------------------------------------
def _row_shards(w, what: str) -> Tuple[int, int, torch.Tensor, Optional[dist.ProcessGroup]]:
    """(first row, row count, local rows, the group the rows are spread over) of a DTensor weight
    sharded on dim 0 (FSDP2: Shard(0), with Replicate() on HSDP's replica dimension)."""
    shard_dims = [i for i, p in enumerate(w.placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or w.placements[shard_dims[0]].dim != 0 or w.dim() != 2:
        raise AdapterError(f"{what}: its weight is sharded as {tuple(w.placements)} of a {w.dim()}-d tensor; LoLDU "
                           "adapts weights sharded on dim 0 only (FSDP2's fully_shard)")
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return offset[0], shape[0], w.to_local(), w.device_mesh.get_group(shard_dims[0])


def _sum_bits(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' `t` summed where each element is nonzero on at most one rank, bit for bit (the
    bytes are summed as integers, so -0.0 and every NaN payload survive)."""
    flat = t.contiguous().view(torch.uint8)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.view(t.dtype).view(t.shape)


def gather_reads(w, r: int, pivots: Optional[torch.Tensor], what: str) -> Tuple[torch.Tensor, ...]:
    """W0[:, :r] of a row-sharded (d, k) weight, whole on every rank; with `pivots`, also W0[pivots, :]."""
    first, n, local, group = _row_shards(w, what)
    d, k = w.shape
    cols = local.new_zeros(d, r)
    cols[first:first + n] = local[:, :r]
    cols = _sum_bits(cols, group)
    if pivots is None:
        return (cols,)
    pivots = pivots.to(local.device)
    mine = (pivots >= first) & (pivots < first + n)
    rows = local.new_zeros(pivots.shape[0], k)
    rows[mine] = local.index_select(0, pivots[mine] - first)
    return cols, _sum_bits(rows, group)


def _all_finite(w, group) -> bool:
    """Whether every shard of `w` is finite (each rank checks its rows; the verdict is shared)."""
    local = w.to_local()  # the flag lives where the backend communicates (NCCL: on the GPU)
    ok = torch.tensor([int(bool(torch.isfinite(local).all()))], dtype=torch.int64, device=local.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


# -- the factorization ---------------------------------------------------------------------------
class ShardedFactors(LDUResult):
    """An LDUResult of a sharded weight, with the fingerprint of the reads it came from (integrity)."""

    fingerprint: bytes = b""


def factor_panel(cols: torch.Tensor, rows_of, r: int, pivoting: str,
                 pivots: Optional[torch.Tensor] = None) -> LDUResult:
    """The leading-r factors from the panel `cols` = W0[:, :r] and the pivot rows `rows_of(pivots)`:
    the panel's LU (partial pivoting chooses I from it alone, docs/method.md §1) gives PL, D and the
    pivots; U = D^-1 L11^-1 W0[I, :] is one triangular solve, in the working dtype."""
    res = ldu(cols, r, pivoting=pivoting) if pivots is None else ldu_from_pivots(cols, pivots.to(cols.device))
    rows = rows_of(res.pivots)
    wide = res.D.dtype
    L11 = res.PL.index_select(0, res.pivots).to(wide)
    U = torch.linalg.solve_triangular(L11, rows.to(wide), upper=False, unitriangular=True) / res.D[:, None]
    if not bool(torch.isfinite(U).all()):
        raise FactorizationError(f"the factors of the ({cols.shape[0]}, {rows.shape[1]}) weight at rank {r} are not "
                                 "finite (a negligible pivot)")
    return LDUResult(res.PL, res.D, U.to(res.U.dtype), res.pivots)


def _rank(config, name: str, shape: Tuple[int, int], kind: str) -> int:
    rank_for = getattr(config, "rank_for", None)
    if rank_for is not None:
        return rank_for(name, shape, kind)
    if config.rank > min(shape):
        raise AdapterError(f"layer '{name}': rank {config.rank} exceeds min(d, k) = {min(shape)} of its {kind} "
                           f"weight viewed as {shape}")
    return config.rank


class _LazyFactors(dict):
    """name -> the layer's ShardedFactors, factored when first asked (by build_layers, one layer at a
    time, so at most one layer's whole factors exist at once on a rank) and not kept."""

    def __init__(self, jobs: Dict[str, tuple]):
        super().__init__()
        self.jobs = jobs

    def __getitem__(self, name):
        module, r, pivoting, pivots = self.jobs[name]
        w = module.weight
        d, k = w.shape
        what = f"layer '{name}' (weight {(d, k)})"
        cols, = gather_reads(w, r, None, what)
        got = []

        def rows_of(piv):
            got.append(gather_reads(w, r, piv, what)[1])
            return got[-1]

        try:
            res = factor_panel(cols, rows_of, r, pivoting, pivots)
        except FactorizationError as e:
            raise AdapterError(f"{what}: {e}") from None
        out = ShardedFactors(*res)
        out.fingerprint = fingerprint_reads((d, k), cols, got[-1])  # what a whole W0 would read (integrity)
        return out

    def __contains__(self, name):
        return name in self.jobs


def factorize_sharded(targets, config, pivots: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, LDUResult]:
    """loldu.factorize for targets whose weights are sharded: every check now (kind, sharding, rank,
    NaN/Inf), the factors lazily (`_LazyFactors`). Collective."""
    jobs = {}
    for name, module, kind in targets:
        w = module.weight
        if kind not in ("linear", "embedding") or not is_sharded(w):
            raise AdapterError(f"layer '{name}': a sharded model's targets must be nn.Linear or nn.Embedding layers "
                               f"whose weights are sharded DTensors (FSDP2's fully_shard); this {kind} weight is a "
                               f"{type(w).__name__}")
        _row_shards(w, f"layer '{name}'")
        r = _rank(config, name, tuple(w.shape), kind)
        if config.pivoting not in ("partial", "none"):  # pragma: no cover - LoLDUConfig checks it
            raise AdapterError(f"layer '{name}': pivoting {config.pivoting!r} is not supported on a sharded weight")
        jobs[name] = (module, r, config.pivoting, None if pivots is None else pivots[name].to(torch.int64))
    for name, (module, *_) in jobs.items():
        if not _all_finite(module.weight, _row_shards(module.weight, name)[3]):
            raise AdapterError(f"layer '{name}' (weight {tuple(module.weight.shape)}): the base weight holds NaN or "
                               "Inf; the adapted layer's outputs would be NaN")
    return _LazyFactors(jobs)


# -- the factors, sharded --------------------------------------------------------------------------
def _meta_matrix(layer) -> torch.Tensor:
    """A meta tensor of W0's (d, k) shape and dtype: the shape and dtype a sharded layer's W0 reports
    at rest (its values live on the ranks; `whole` gathers them where they are needed)."""
    w = layer.base_layer._parameters["weight"]
    return torch.empty(tuple(w.shape), dtype=w.dtype, device="meta")


class _ShardedStore:
    """Mixed into a factor store (loldu.stores) for a layer whose base weight is a DTensor: the factors
    are parameters with requires_grad=False (shard_layer gives them to fully_shard), W0 at rest is a
    meta matrix of its shape, and "lu" writes the packed LU into the weight's own shards."""

    fingerprint: Optional[bytes] = None

    def base_matrix(self, layer):
        if is_sharded_layer(layer):
            return _meta_matrix(layer)
        return super().base_matrix(layer)

    def set_factors(self, layer, factors, factor_dtype, d_dtype, stacklevel):
        from .stores import FACTOR_KEYS
        for keys in FACTOR_KEYS.values():
            for key in keys:
                if key in layer._parameters:
                    del layer._parameters[key]
        super().set_factors(layer, factors, factor_dtype, d_dtype, stacklevel + 1)
        self.fingerprint = getattr(factors, "fingerprint", None)
        if not self.owns_weight:
            for key in self.keys:
                layer.register_parameter(key, nn.Parameter(layer._buffers.pop(key), requires_grad=False))

    def _factor(self, layer, key):
        return layer._parameters[key] if key in layer._parameters else layer._buffers[key]

    def dtype(self, layer):
        return super().dtype(layer) if self.owns_weight else self._factor(layer, self.keys[0]).dtype

    def buffers(self, layer):
        return super().buffers(layer) if self.owns_weight else {k: self._factor(layer, k) for k in self.keys}

    def keep_held(self, layer, before, fn=None):
        """A sharded layer is not cast after inject (FSDP2 owns its dtypes: MixedPrecisionPolicy)."""

    def nbytes(self, layer):
        """Bytes this rank holds: its shards of the factors, D and the pivots."""
        own = [] if self.owns_weight else [self._factor(layer, k) for k in self.keys]
        own = [t.to_local() if is_sharded(t) else t for t in own] + [layer.loldu_D, layer.loldu_pivots]
        return sum(t.numel() * t.element_size() for t in own)

    @torch.no_grad()
    def install(self, layer):
        """"lu": the rank's rows of the packed LU into the weight's shard (W0's dtype and fingerprint kept)."""
        if not (self.owns_weight and self.pending is not None and is_sharded_layer(layer)):
            return super().install(layer)
        from .stores import _guard
        w = layer.base_layer.weight
        first, n, local, _ = _row_shards(w, f"layer '{layer.layer_name}'")
        self.w0_dtype = w.dtype
        layer.w0_fingerprint = self.fingerprint
        local.copy_(self.pending[first:first + n].to(local.dtype))
        self.pending = None
        _guard(layer, True)


_SHARDED_STORES: Dict[type, type] = {}


def sharded_store(store_class: type) -> type:
    """The class of `store_class` for sharded base weights (_ShardedStore mixed in)."""
    if store_class not in _SHARDED_STORES:
        _SHARDED_STORES[store_class] = type(f"Sharded{store_class.__name__}", (_ShardedStore, store_class), {})
    return _SHARDED_STORES[store_class]


def shard_layer(layer):
    """Shards a new LoLDU layer's factor parameters on its base weight's mesh (fully_shard of the layer,
    the base weight and the adapters left out) and records W0's fingerprint from the inject's reads.
    Returns the layer (its class becomes FSDP's subclass of it)."""
    if not is_sharded_layer(layer):
        return layer
    layer.w0_fingerprint = layer.store.fingerprint
    factors = [p for k, p in layer._parameters.items() if k in layer.store.keys]
    if not factors:
        return layer
    ignored = {p for p in layer.parameters() if not any(p is q for q in factors)}
    fully_shard(layer, mesh=layer.base_layer.weight.device_mesh, ignored_params=ignored)
    return layer


# -- the adapters' gradients ---------------------------------------------------------------------
class _AverageGrad:
    """Post-accumulate-grad hook of a z or sigma kept whole on every rank: the gradient averaged over
    the ranks of the mesh (what FSDP2 does for the sharded ones), so all ranks step alike."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __call__(self, p: torch.Tensor) -> None:
        if p.grad is None:  # pragma: no cover - called after accumulation
            return
        for dim in range(self.mesh.ndim):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.mesh.get_group(dim))
        p.grad.div_(self.mesh.size())


def _states(root: nn.Module) -> list:
    """The FSDP2 states of the modules under `root` (fully_shard'ed ones), each once, in module order."""
    out = []
    for m in root.modules():
        if isinstance(m, FSDPModule):
            st = m._get_fsdp_state()
            if st not in out:
                out.append(st)
    return out


def reshard(model: nn.Module) -> None:
    """Every fully_shard'ed module of the model back to its shards (FSDP2 keeps the root's parameters
    gathered after a forward), so that what an edit freezes or reads is the sharded parameters."""
    if FSDPModule is None or not dist.is_initialized():
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _join_root(root: nn.Module) -> None:
    """LoLDU layers sharded after the model's first forward: FSDP2 chose its root then and would make
    each new layer a root of its own at its first forward (never resharding its factors after it).
    They join the existing root instead, as if they had been there at its first forward."""
    states = _states(root)
    roots = [st for st in states if st._is_root]
    new = [st for st in states if st._is_root is None]
    if len(roots) != 1 or not new:
        return  # not initialized yet: the first forward finds every state itself
    top = roots[0]
    for st in new:
        st._is_root = False
        top._state_ctx.all_states.append(st)
    top._init_shared_state()
    top._init_fqns()
    for st in new:
        for group in st._fsdp_param_groups:
            group.lazy_init()


def _sync_requires_grad(root: nn.Module) -> None:
    """FSDP2 keeps one gathered Parameter per sharded one, made at the first all-gather with the
    sharded one's requires_grad; an edit that freezes (inject) or unfreezes (unload) the sharded
    parameters is copied onto them."""
    for st in _states(root):
        for group in st._fsdp_param_groups:
            for fp in group.fsdp_params:
                gathered = getattr(fp, "_unsharded_param", None)
                if gathered is not None:
                    gathered.requires_grad_(fp.sharded_param.requires_grad)


def settle(model: nn.Module) -> None:
    """After an edit of a sharded model (inject, add_adapter, load_adapter, unload): new layers join
    FSDP2's root, the gathered parameters take the sharded ones' requires_grad, and every z and
    sigma of a sharded layer averages its gradient over the ranks (_AverageGrad)."""
    from .state import adapted_layers, unwrap
    if FSDPModule is None or not dist.is_initialized():
        return
    root = unwrap(model)
    _join_root(root)
    _sync_requires_grad(root)
    for _, layer in adapted_layers(model):
        if not is_sharded_layer(layer):
            continue
        for p in list(layer.loldu_z.values()) + list(layer.loldu_sigma.values()):
            if not getattr(p, _SYNCED, False):
                # torch registers the hook only on a tensor that requires grad; it stays when the flag
                # is cleared, and runs once set_adapter makes this adapter train.
                flag = p.requires_grad
                p.requires_grad_(True)
                p.register_post_accumulate_grad_hook(_AverageGrad(layer.base_layer.weight.device_mesh))
                p.requires_grad_(flag)
                setattr(p, _SYNCED, True)


# -- one layer whole -------------------------------------------------------------------------------
@contextlib.contextmanager
def whole(layer) -> Iterator[None]:
    """Within: the layer's base weight is a plain Parameter holding the whole W0 (gathered) and its
    factors are unsharded, so the single-process code of merge, unmerge and unload runs unchanged;
    on exit the rank's rows of what it left in the weight go back into its shard. Collective; one
    layer's weight and factors whole at a time. A layer that is not sharded is left as it is."""
    if not is_sharded_layer(layer):
        yield
        return
    base = layer.base_layer
    w = base._parameters["weight"]
    first, n, local, _ = _row_shards(w, f"layer '{layer.layer_name}'")
    plain = nn.Parameter(w.full_tensor(), requires_grad=w.requires_grad)
    base._parameters["weight"] = plain
    fsdp = isinstance(layer, FSDPModule)
    if fsdp:
        layer.unshard()
    try:
        yield
    finally:
        with torch.no_grad():
            local.copy_(plain.detach()[first:first + n].to(local.dtype))
        base._parameters["weight"] = w
        if fsdp:
            layer.reshard()


# -- files -----------------------------------------------------------------------------------------
def rank_zero() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None, **kwargs) -> Optional[Dict[str, int]]:
    """loldu.save_adapter from every rank of a sharded (or data-parallel) model: rank 0 writes (z, sigma
    and the pivots are whole on every rank, the fingerprints were taken at inject), the others wait
    for it and raise the same AdapterError when it failed. The crash safety is save_adapter's."""
    from .adapter_io import save_adapter as save
    if not (dist.is_available() and dist.is_initialized()):
        return save(model, directory, adapter_name, **kwargs)
    result: List = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = ("ok", save(model, directory, adapter_name, **kwargs))
        except Exception as e:  # every rank raises it: the caller sees one outcome everywhere
            result[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise AdapterError(f"loldu.distributed.save_adapter (written by rank 0): {value}")
    return value


def fingerprint_any(W: torch.Tensor, pivots: torch.Tensor) -> bytes:
    """integrity.fingerprint of a (d, k) weight, also of a row-sharded DTensor one: there it gathers
    exactly what the fingerprint hashes, W[:, :r] and the pivot rows (collective)."""
    from .integrity import fingerprint
    if not is_sharded(W):
        return fingerprint(W, pivots)
    cols, rows = gather_reads(W, pivots.shape[0], pivots.to(torch.int64), f"weight {tuple(W.shape)}")
    return fingerprint_reads(tuple(W.shape), cols, rows)


def refuse_sharded_saved(saved) -> None:
    """modules_to_save are trained as whole copies beside the model; a copy of a sharded module would hold
    DTensors that no fully_shard manages (its forward would mix them with the gathered inputs): refused
    by name, before anything changes."""
    for name, module in saved:
        if any(is_sharded(p) for p in module.parameters()):
            raise AdapterError(f"module '{name}' (modules_to_save): its parameters are sharded (FSDP2); LoLDU does not "
                               "train saved modules of a sharded model yet. Leave it out of modules_to_save (and "
                               "task_type, which adds the task head there), or train unsharded")
