"""How a model is wrapped and edited: inject, named adapters, merge/unload, disabled, mixed batches.

Every function takes a model (a DDP or torch.compile wrapper is looked through) and edits it in
place. Editing is transactional: all checks and all factorizations happen before the first module
is swapped, so a failure leaves the model exactly as it was. Finding the modules to adapt and to
save is loldu.targets, factorizing them loldu.factorize, the run-time call check loldu.callcheck;
their public names are importable from here too.
"""
import contextlib
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .callcheck import CALL_CHECK_FORWARDS, CallCheck
from .config import LoLDUConfig
from .distributed import refuse_sharded_saved, reshard, settle, whole
from .errors import AdapterError
from .factorize import build_layers, factorize
from .heads import SavedModule
from .integrity import c_refusal, stale_refusal
from .layer import LoLDULayer, weight_refusal
from .spec import ADAPTER_NAME_PATTERN
from .state import AdapterState, adapted_layers, unwrap
from .targets import HEADS, Targets, find_saved, find_targets

__all__ = [  # the verbs, and the names loldu.model has always offered (state, targets, factorize, callcheck)
    "CALL_CHECK_FORWARDS", "HEADS", "Targets", "AdapterState", "adapted_layers", "unwrap", "find_targets",
    "find_saved", "factorize", "build_layers", "commit", "inject", "inject_with", "adapter_names", "active_adapter",
    "add_adapter", "add_with", "set_adapter", "delete_adapter", "trainable_parameters", "parameter_counts",
    "print_trainable_parameters", "merge", "unmerge", "unload", "merge_and_unload", "disabled", "adapter_ids",
]

_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
_SAVED_FLAGS = "_loldu_requires_grad"
_CALL_CHECK = "_loldu_call_check"
_LOAD_CHECK = "_loldu_load_check"  # the load_state_dict pre-hook is registered


def _state(model) -> AdapterState:
    """The model's adapters; AdapterError when it has no LoLDU layers."""
    return AdapterState.of(model).require_layers()


def _check_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
        raise AdapterError(f"adapter name must be an identifier-like str (letters, digits, _ or -), got {adapter_name!r}")


def commit(model: nn.Module, layers: Dict[str, LoLDULayer], adapter_name: str, check_calls: bool = True,
           saved: Optional[Dict[str, SavedModule]] = None, trainable: bool = True) -> None:
    """Freezes every parameter, swaps the wrappers (LoLDU layers and saved modules) in and activates
    `adapter_name` (trainable unless `trainable` is False).

    With `check_calls`, also arms the one-time check that every layer is called by its parent
    (loldu.callcheck.CallCheck).
    """
    root = unwrap(model)
    reshard(root)  # FSDP2: freeze the sharded parameters, not a forward's gathered copies
    saved = saved or {}
    params = [(p, p.requires_grad) for p in root.parameters()]
    originals = []
    try:
        for name, wrapper in list(layers.items()) + list(saved.items()):
            parent, _, attr = name.rpartition(".")
            holder = root.get_submodule(parent)
            originals.append((holder, attr, getattr(holder, attr)))
            setattr(holder, attr, wrapper)
    except Exception:
        for holder, attr, module in reversed(originals):
            setattr(holder, attr, module)
        raise
    for p, _ in params:
        p.requires_grad_(False)
    state = AdapterState(list(layers.items()), saved=list(saved.items()))
    state.set_active(adapter_name, trainable=trainable)
    # Plain attributes (not Modules/Parameters), so they stay out of state_dict.
    object.__setattr__(root, _SAVED_FLAGS, params)
    if check_calls:
        object.__setattr__(root, _CALL_CHECK, CallCheck(root, list(layers)))
    if not getattr(root, _LOAD_CHECK, False):
        root.register_load_state_dict_pre_hook(_prepare_layers_for_load)
        object.__setattr__(root, _LOAD_CHECK, True)


def _prepare_layers_for_load(module: nn.Module, state_dict, prefix, local_metadata, *_) -> None:
    """load_state_dict pre-hook of an adapted model: every LoLDU layer checks (and factorizes) what the
    state_dict brings it before any module loads, so a refused layer leaves the whole model as it was
    (torch loads module by module and would otherwise have loaded the layers before it)."""
    assign = local_metadata.get("assign_to_params_buffers", False)
    prepared = []
    for name, layer in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(layer, LoLDULayer):
            sub = name + "." if name else ""
            prepared.append((layer, (id(state_dict), sub, layer.prepare_load(state_dict, sub, assign))))
    for layer, result in prepared:
        layer._prepared = result


@contextlib.contextmanager
def _named(where: Optional[str]) -> Iterator[None]:
    """AdapterErrors raised inside, prefixed with `where` (the file load_adapter reads) when given."""
    try:
        yield
    except AdapterError as e:
        if where is None:
            raise
        raise AdapterError(f"{where}: {e}") from None


def inject(model: nn.Module, config: LoLDUConfig, adapter_name: str = "default", *,
           progress: Optional[bool] = None, check_calls: bool = True) -> nn.Module:
    """Wraps every module `config.target_modules` selects and returns `model` (edited in place).

    Supported: nn.Linear, nn.Conv2d (groups=1), nn.Embedding, transformers Conv1D. The base weights
    are not rewritten; the adapter starts at c == 0, so outputs are unchanged. Afterwards only z
    (and sigma if config.train_scale) require grad. `progress`: progress output (default: from 32 layers; loldu.progress).
    Raises AdapterError naming the layer (unsupported type, rank too large, degenerate or non-finite
    weight, a weight recomputed on every forward (parametrized, weight_norm), a lazy or meta weight,
    a module registered under two names, or a module its parent reads the weight of instead of
    calling it, e.g. nn.MultiheadAttention.out_proj).
    check_calls: the first forwards check that every adapted layer is called when its parent runs:
    a layer its parent has run CALL_CHECK_FORWARDS (8) times without calling raises AdapterError
    naming the layer and the parent's class; layers are settled (their hooks removed) as soon as
    they are called. A parent that legitimately calls a layer only rarely (a mixture of experts with
    many experts) may pass check_calls=False; the static refusals above still apply.
    With activation checkpointing, use non-reentrant checkpoints (transformers' default) or make the
    inputs require grad: a reentrant checkpoint whose inputs need no grad passes no gradient to z.
    """
    return inject_with(model, config, adapter_name, progress=progress, check_calls=check_calls)


def inject_with(model: nn.Module, config: LoLDUConfig, adapter_name: str, *,
                pivots: Optional[Dict[str, torch.Tensor]] = None, values: Optional[Dict[str, tuple]] = None,
                check: Optional[Callable[[Targets], None]] = None, progress: Optional[bool] = None,
                where: Optional[str] = None, check_calls: bool = True,
                saved_values: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                check_saved: Optional[Callable[[List[Tuple[str, nn.Module]]], None]] = None,
                trainable: bool = True) -> nn.Module:
    """loldu.inject, and loldu.load_adapter into a plain model: the one path that wraps a model.

    pivots: layer name -> (r,) int64; the frozen factors are re-derived from them
        (loldu.ldu_from_pivots) instead of choosing pivots.
    values: layer name -> (z, sigma) of the adapter; default z = D, sigma = sigma0 (c == 0).
    check: called with the targets before anything is factorized; raises to refuse them.
    where: prefixes the AdapterErrors of finding and factorizing the targets (load_adapter's file).
    check_calls: arm the run-time check that every layer is called by its parent (see loldu.inject).
    saved_values: saved module name -> its state_dict (load_adapter); default: copies of the originals.
    check_saved: called with the saved modules (name, module) found; raises to refuse them.
    trainable: whether the adapter's parameters require grad afterwards.
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"loldu.inject: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoLDUConfig):
        raise AdapterError(f"loldu.inject: config must be a LoLDUConfig, got {type(config).__name__}")
    if not isinstance(check_calls, bool):
        raise AdapterError(f"loldu.inject: check_calls must be a bool, got {check_calls!r}")
    _check_name(adapter_name)
    if adapted_layers(model):
        raise AdapterError("loldu.inject: the model already has LoLDU layers; use loldu.add_adapter for another adapter")
    root = unwrap(model)
    with _named(where):
        targets = find_targets(root, config)
        found_saved = find_saved(root, config, targets)
    if check is not None:
        check(targets)
    if check_saved is not None:
        check_saved(found_saved)
    refuse_sharded_saved(found_saved)
    if config.factor_storage == "lu":
        _refuse_shared_weights(root, targets)
    with _named(where):
        factors = factorize(targets, config, pivots=pivots, progress=progress)
    layers = build_layers(targets, factors, config)
    saved = {n: SavedModule(m, n) for n, m in found_saved}
    prefix = f"{where}: " if where else ""
    AdapterState(list(layers.items()), saved=list(saved.items())).add(adapter_name, config, values, saved_values,
                                                                       where=prefix)
    commit(model, layers, adapter_name, check_calls, saved, trainable)
    settle(model)  # a sharded model: the new layers join FSDP2, z and sigma average their gradients
    return model


def _refuse_shared_weights(root: nn.Module, targets: Targets) -> None:
    """factor_storage="lu" puts the packed LU in place of a target's weight Parameter: a module sharing
    that Parameter (a tied LM head, an embedding) would then compute with the LU. Refused by name."""
    holders: Dict[int, List[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if w is not None:
            holders.setdefault(id(w), []).append(name)
    for name, module, _ in targets:
        others = [n for n in holders.get(id(module.weight), []) if n != name]
        if others:
            raise AdapterError(f"layer '{name}': its weight is shared with {others} (tied weights); "
                               "factor_storage='lu' replaces the weight by its packed LU, which the other module would "
                               "use too. Use factor_storage='full' or 'cur' for it, or untie the weights first")


def adapter_names(model: nn.Module) -> List[str]:
    """Names of the model's adapters, in the order they were added."""
    return _state(model).names


def active_adapter(model: nn.Module) -> Optional[str]:
    return _state(model).active


def add_adapter(model: nn.Module, adapter_name: str, config: Optional[LoLDUConfig] = None) -> nn.Module:
    """Adds adapter `adapter_name` (z = D, sigma = sigma0) to every LoLDU layer; not activated.

    It shares each layer's frozen factors: r + 1 new numbers per layer. `config` defaults to the
    active adapter's; its rank, pivoting and factor_dtype must match, and it must target the same layers.
    """
    return add_with(model, adapter_name, config)


def add_with(model: nn.Module, adapter_name: str, config: Optional[LoLDUConfig] = None, *,
             pivots: Optional[Dict[str, torch.Tensor]] = None, values: Optional[Dict[str, tuple]] = None,
             check: Optional[Callable[[Targets], None]] = None, what: Optional[str] = None,
             where: Optional[str] = None, saved_values: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
             check_saved: Optional[Callable[[List[Tuple[str, nn.Module]]], None]] = None) -> nn.Module:
    """loldu.add_adapter, and loldu.load_adapter into an injected model: the one path that adds an adapter.

    pivots: layer name -> (r,) pivots the adapter was trained with; each must equal the layer's, as
    the adapter shares its frozen factors. values, check, where: as for inject_with (the targets are
    every LoLDU layer's (name, base module, kind)). what: the caller, as named in errors.
    """
    state = _state(model)
    _check_name(adapter_name)
    if adapter_name in state.names:
        raise AdapterError(f"loldu.add_adapter: adapter {adapter_name!r} already exists")
    if config is None:
        config = state.config(state.active or state.names[0])
    if not isinstance(config, LoLDUConfig):
        raise AdapterError(f"loldu.add_adapter: config must be a LoLDUConfig, got {type(config).__name__}")
    with _named(where):
        state.require_fits(config, what or f"loldu.add_adapter({adapter_name!r})")
    if check is not None:
        check([(n, layer.base_layer, layer.kind) for n, layer in state.layers])
    if check_saved is not None:
        check_saved([(n, m.original_module) for n, m in state.saved])
    if pivots is not None:
        with _named(where):
            for n, layer in state.layers:
                if not torch.equal(pivots[n].cpu(), layer.loldu_pivots.cpu()):
                    raise AdapterError(f"layer '{n}': stored pivots differ from the injected layer's pivots, so the "
                                       "adapter does not fit its frozen factors")
                why = stale_refusal(layer)
                if why is not None:
                    raise AdapterError(f"layer '{n}': {why}")
    state.add(adapter_name, config, values, saved_values, where=f"{where}: " if where else "")
    settle(model)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes `adapter_name` the one the forward uses and the only one whose parameters train."""
    state = _state(model)
    state.require_exists(adapter_name, "loldu.set_adapter")
    state.require_unmerged("loldu.set_adapter")
    state.set_active(adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Removes adapter `adapter_name`; if it was active, the first remaining one becomes active."""
    state = _state(model)
    state.require_exists(adapter_name, "loldu.delete_adapter")
    merged = state.first_merged()
    if merged is not None and merged[1] == adapter_name:
        raise AdapterError(f"loldu.delete_adapter: adapter {adapter_name!r} is merged into layer '{merged[0]}'; "
                           "unmerge first")
    if len(state.names) == 1:
        raise AdapterError(f"loldu.delete_adapter: {adapter_name!r} is the only adapter; use loldu.unload")
    state.require_no_row_ids(f"loldu.delete_adapter: adapter {adapter_name!r} is in use by loldu.adapter_ids")
    was_active = state.active == adapter_name
    if was_active and merged is not None:  # checked before anything changes: the replacement cannot be activated
        raise AdapterError(f"loldu.delete_adapter: {adapter_name!r} is active and layer '{merged[0]}' is merged; "
                           "call loldu.unmerge first")
    state.delete(adapter_name)
    if was_active:
        set_adapter(model, state.names[0])
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters that require grad (what to give the optimizer): the active adapter's z (and sigma)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(trainable, all) numbers of parameters of the model."""
    return sum(p.numel() for p in trainable_parameters(model)), sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Prints PEFT's line 'trainable params: T || all params: A || trainable%: P'; returns (T, A)."""
    trainable, total = parameter_counts(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def _merge_refusal(layer: LoLDULayer, name: Optional[str] = None) -> Optional[str]:
    """Why `layer`'s base weight cannot take adapter `name`'s ΔW (None: have its merged ΔW removed) in place now."""
    why = weight_refusal(layer.base_layer)
    if why is not None:
        return why
    w = layer.base_layer.weight
    if w.is_inference() and not torch.is_inference_mode_enabled():
        return ("its weight is an inference tensor (created under torch.inference_mode()), which cannot be written "
                "outside inference mode: merge inside `with torch.inference_mode():`, or give the module an ordinary "
                "weight first (module.weight = nn.Parameter(module.weight.clone()))")
    if any(st == 0 and n > 1 for st, n in zip(w.stride(), w.shape)):
        return "its weight is an expanded view (several elements share one memory location), which cannot be written"
    if w.device != layer.loldu_D.device:
        return f"its weight is on {w.device} but its LoLDU factors are on {layer.loldu_D.device}; move the whole model"
    if name is None:
        return None
    c = layer.coefficients(name)
    if not bool(torch.isfinite(c).all()):
        return f"adapter {name!r} has NaN/Inf coefficients c (z or sigma diverged)"
    why = c_refusal(c) or stale_refusal(layer)
    return None if why is None else f"adapter {name!r}: {why}"


def merge(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Folds ΔW of `adapter_name` (default: the active one) into every base weight, in fp32, cast back.

    Afterwards the forward is the plain base modules' forward. Undo with loldu.unmerge.
    Every layer is checked before any weight is written (AdapterError naming the layer, model
    unchanged): its weight must be writable in place (not an inference tensor outside inference
    mode, not recomputed by a parametrization, not on meta, not tied to another module) and the
    adapter's coefficients finite. Should writing still fail, the layers merged so far are unmerged
    again (as loldu.unmerge leaves them) before the AdapterError.
    """
    state = _state(model)
    name = adapter_name or state.active
    state.require_exists(name, "loldu.merge")
    state.require_unmerged("loldu.merge", "is already merged")
    state.require_no_row_ids(f"loldu.merge: adapter {name!r} is in use by loldu.adapter_ids")
    if state.saved and name != state.active:
        raise AdapterError(f"loldu.merge: adapter {name!r} is not the active one ({state.active!r}) and the model's "
                           f"saved modules ('{state.saved[0][0]}', ...) run the active adapter's copy; call "
                           f"loldu.set_adapter(model, {name!r}) first")
    layers = state.layers
    # A tied weight (e.g. embedding and LM head), adapted or not on the other side, would receive ΔW
    # for every module that uses it: count each base weight's occurrences among all parameters.
    holders: Dict[int, List[str]] = {}
    for pn, p in unwrap(model).named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pn)
    for _, layer in layers:
        users = holders.get(id(layer.base_layer.weight), [])
        if len(users) > 1:
            tied = [m for m, l in layers if l.base_layer.weight is layer.base_layer.weight]
            raise AdapterError(f"loldu.merge: layers {', '.join(repr(m) for m in tied)}: weight is shared by "
                               f"{', '.join(users)} (tied weights; they share one weight tensor); merging would "
                               "change every module using it. Keep them unmerged (delta form)")
    for n, layer in layers:
        with whole(layer):  # a sharded layer: one layer's W0 gathered at a time (loldu.distributed)
            why = _merge_refusal(layer, name)
        if why is not None:
            raise AdapterError(f"loldu.merge: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}): {why}")
    for n, layer in layers:
        with whole(layer):
            finite = _merges_finite(layer, name)
        if not finite:
            raise AdapterError(f"loldu.merge: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}): adapter "
                               f"{name!r}: the merged weight W0 + ΔW would hold NaN/Inf (it overflows "
                               f"{layer.base_layer.weight.dtype}); nothing was merged, the model is unchanged")
    done: List[LoLDULayer] = []
    for n, layer in layers:
        try:
            with whole(layer):
                layer.merge(name)
        except Exception as e:
            for merged in reversed(done):
                with whole(merged):
                    merged.unmerge()
            raise AdapterError(f"loldu.merge: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}): cannot "
                               f"write the merged weight ({type(e).__name__}: {' '.join(str(e).split())}); the "
                               f"{len(done)} layer(s) merged before it were unmerged again") from e
        done.append(layer)
    return model


@torch.no_grad()
def _merges_finite(layer: LoLDULayer, name: str) -> bool:
    """Whether merging adapter `name` leaves every element of the layer's weight finite (the adapter
    spec's c_check at merge), from the matrix LoLDULayer.merge would write, before anything is written."""
    return bool(torch.isfinite(layer.merged_matrix(name)).all())


def _require_unmergeable(layers: Sequence[Tuple[str, LoLDULayer]], what: str) -> None:
    """Every merged layer's weight must be writable now (checked before any is unmerged)."""
    for n, layer in layers:
        with whole(layer) if layer.merged_adapter is not None else contextlib.nullcontext():
            why = None if layer.merged_adapter is None else _merge_refusal(layer)
        if why is not None:
            raise AdapterError(f"{what}: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}) cannot be "
                               f"unmerged: {why}")


def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts the merged ΔW again (the same fp32 ΔW). What the factorization and an adapter
    file's fingerprint read, W0[:, :r] and W0[pivots, :], is restored exactly (the adapter still
    saves and loads on the base); the rest of each weight returns within one rounding.

    Every merged layer's weight is checked to be writable first (AdapterError, model unchanged).
    """
    layers = _state(model).layers
    _require_unmergeable(layers, "loldu.unmerge")
    for _, layer in layers:
        with whole(layer) if layer.merged_adapter is not None else contextlib.nullcontext():
            layer.unmerge()
    return model


def _strip(model: nn.Module, keep_heads: bool = False) -> nn.Module:
    """Puts the base modules back; a saved module becomes its original, or with `keep_heads` the
    active adapter's trained copy (merge_and_unload)."""
    root = unwrap(model)
    state = AdapterState.of(root)
    for name, layer in state.layers:
        parent, _, attr = name.rpartition(".")
        with whole(layer) if layer.store.owns_weight and layer.merged_adapter is None else contextlib.nullcontext():
            layer.restore_base()  # W0 back in the weight where the factor store kept its own form there
        setattr(root.get_submodule(parent), attr, layer.base_layer)
    for name, m in state.saved:
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent), attr, m.current if keep_heads else m.original_module)
    for p, flag in root.__dict__.pop(_SAVED_FLAGS, []):
        p.requires_grad_(flag)
    if keep_heads:  # the kept copies get the flags their originals had before inject
        for _, m in state.saved:
            for kept, orig in zip(m.current.parameters(), m.original_module.parameters()):
                kept.requires_grad_(orig.requires_grad)
    check = root.__dict__.pop(_CALL_CHECK, None)
    if check is not None:
        check.remove()
    settle(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Puts the original modules back (unmerging first) and restores their requires_grad flags.

    The weights are the very tensors the model had: bit-identical unless it was merged meanwhile
    (then as loldu.unmerge leaves them: exact where the factorization reads, within one rounding elsewhere).
    """
    state = _state(model)
    state.require_no_row_ids("loldu.unload: the adapters are in use by loldu.adapter_ids")
    _require_unmergeable(state.layers, "loldu.unload")
    for _, layer in state.layers:
        with whole(layer) if layer.merged_adapter is not None else contextlib.nullcontext():
            layer.unmerge()
    return _strip(model)


def merge_and_unload(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Merges, then puts the plain modules (now holding W0 + ΔW) back: a model without loldu."""
    state = _state(model)
    state.require_no_row_ids("loldu.merge_and_unload: the adapters are in use by loldu.adapter_ids")
    merged = state.merged
    if merged is None:
        merge(model, adapter_name)
    elif adapter_name is not None and merged != adapter_name:
        raise AdapterError(f"loldu.merge_and_unload: adapter {merged!r} is merged, not {adapter_name!r}; "
                           "call loldu.unmerge first")
    return _strip(model, keep_heads=True)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with loldu.disabled(model):` the model computes its base outputs (unmerged models only)."""
    state = _state(model)
    state.require_unmerged("loldu.disabled")
    switches = state.switches
    before = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(switches, before):
            m.disabled = flag


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: Union[torch.Tensor, Sequence[Optional[str]]]) -> Iterator[nn.Module]:
    """Mixed batch: row i of every input uses its own adapter, in one forward.

    ids: adapter names (None = base model) of length batch, or an int tensor (batch,) indexing
    loldu.adapter_names(model), -1 = base model. Every adapted layer must see the batch as dim 0:
    each checks that its input has as many rows as there are ids, and a model holding a module
    with batch_first=False (nn.MultiheadAttention, nn.Transformer*, RNNs: (seq, batch, ...)
    inputs, so a layer may see the batch on dim 1, and with seq == batch no count would differ) is
    refused.
    """
    state = _state(model)
    names, layers = state.names, state.layers
    if state.saved:
        raise AdapterError(f"loldu.adapter_ids: the model trains saved modules ('{state.saved[0][0]}', "
                           "modules_to_save) per adapter, which cannot be mixed within one batch")
    seq_first = next(((n, m) for n, m in unwrap(model).named_modules() if getattr(m, "batch_first", True) is False),
                     None)
    if seq_first is not None:
        raise AdapterError(f"loldu.adapter_ids: module '{seq_first[0]}' ({type(seq_first[1]).__name__}) has "
                           "batch_first=False: it takes (seq, batch, ...) inputs, so adapted layers may see the batch "
                           "on dim 1 and rows would go to the wrong adapters; per-row adapters need the batch on dim "
                           "0 everywhere: build the model with batch_first=True")
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise AdapterError(f"loldu.adapter_ids: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        idx = ids.long()
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= len(names)):
            raise AdapterError(f"loldu.adapter_ids: ids must lie in [-1, {len(names)}) for adapters {names}")
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise AdapterError(f"loldu.adapter_ids: ids must be a sequence of adapter names (one per row) or an "
                           f"integer tensor, got {type(ids).__name__} {ids!r}")
    else:
        unknown = [n for n in ids if n is not None and n not in names]
        if unknown:
            raise AdapterError(f"loldu.adapter_ids: unknown adapters {unknown}; adapters are {names}")
        idx = torch.tensor([-1 if n is None else names.index(n) for n in ids], dtype=torch.long)
    idx = torch.where(idx < 0, torch.full_like(idx, len(names)), idx)
    state.require_unmerged("loldu.adapter_ids")
    before = [(layer._row_ids, layer._row_names) for _, layer in layers]  # an enclosing adapter_ids'
    for _, layer in layers:
        layer._row_ids, layer._row_names = idx.to(layer.loldu_D.device), names
    try:
        yield model
    finally:
        for (_, layer), (row_ids, row_names) in zip(layers, before):
            layer._row_ids, layer._row_names = row_ids, row_names
