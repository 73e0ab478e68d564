"""How a model is walked and wrapped: inject, named adapters, merge/unload, disabled, mixed batches.

Every function takes a model (a DDP or torch.compile wrapper is looked through) and edits it in
place. Editing is transactional: all checks and all factorizations happen before the first module
is swapped, so a failure leaves the model exactly as it was.
"""
import contextlib
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import LoLDUConfig
from .errors import AdapterError, FactorizationError
from .layer import LAYER_CLASSES, LoLDULayer, check_supported, weight_matrix
from .ldu import LDUResult, ldu, ldu_from_pivots

_PROGRESS_MIN_LAYERS = 32  # show a progress bar from this many layers on
_STACK_BYTES = 256 << 20  # most bytes of weights stacked into one batched factorization call
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_SAVED_FLAGS = "_loldu_requires_grad"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def adapted_layers(model: nn.Module) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of every LoLDU layer, named as the wrapped module was in the base model."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoLDULayer)]


def _layers_or_raise(model) -> List[Tuple[str, LoLDULayer]]:
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError(f"{type(unwrap(model)).__name__} has no LoLDU layers; call loldu.inject first")
    return layers


def _check_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
        raise AdapterError(f"adapter name must be an identifier-like str (letters, digits, _ or -), got {adapter_name!r}")


def find_targets(model: nn.Module, config: LoLDUConfig) -> List[Tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module `config` targets, outside existing LoLDU layers."""
    root = unwrap(model)
    found, inside = [], []
    for name, module in root.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoLDULayer):
            inside.append(name)
            continue
        if config.matches(name):
            found.append((name, module, check_supported(name, module)))
    if not found:
        raise AdapterError(f"target_modules={config.target_modules!r} matches no module of {type(root).__name__}")
    return found


def factorize(targets: Sequence[Tuple[str, nn.Module, str]], config: LoLDUConfig,
              pivots: Optional[Dict[str, torch.Tensor]] = None, progress: Optional[bool] = None) -> Dict[str, LDUResult]:
    """Frozen factors of every target, batched over same-shape weights.

    With `pivots` (name -> (r,) int64), re-derives them from stored pivots (loldu.ldu_from_pivots)
    instead of choosing pivots. Raises AdapterError naming the layer that cannot be factorized.
    """
    r = config.rank
    groups: Dict[tuple, list] = {}
    for name, module, kind in targets:
        W = weight_matrix(module)
        if r > min(W.shape):
            raise AdapterError(f"layer '{name}': rank {r} exceeds min(d, k) = {min(W.shape)} of its "
                               f"{kind} weight viewed as {tuple(W.shape)}")
        groups.setdefault((tuple(W.shape), W.dtype, W.device), []).append((name, W.detach()))
    show = progress if progress is not None else len(targets) >= _PROGRESS_MIN_LAYERS
    out: Dict[str, LDUResult] = {}

    def run(Ws, names):
        if pivots is None:
            return ldu(Ws, r, pivoting=config.pivoting)
        return ldu_from_pivots(Ws, torch.stack([pivots[n] for n in names]).to(Ws.device))

    with tqdm(total=len(targets), desc="loldu: factorizing", disable=not show, leave=False) as bar:
        for (shape, dtype, _), items in groups.items():
            per = max(1, _STACK_BYTES // max(1, shape[0] * shape[1] * torch.finfo(dtype).bits // 8))
            for i in range(0, len(items), per):
                chunk = items[i : i + per]
                names = [n for n, _ in chunk]
                try:
                    res = run(torch.stack([W for _, W in chunk]), names)
                except FactorizationError:
                    res = None
                if res is None:  # find the culprit, one layer at a time
                    for n, W in chunk:
                        try:
                            run(W.unsqueeze(0), [n])
                        except FactorizationError as e:
                            raise AdapterError(f"layer '{n}' (weight {tuple(W.shape)}): {e}") from None
                    raise AdapterError(f"layers {names}: batched factorization failed")  # pragma: no cover
                for j, n in enumerate(names):
                    out[n] = LDUResult(*(t[j] for t in res))
                bar.update(len(chunk))
    return out


def build_layers(targets, factors: Dict[str, LDUResult], config: LoLDUConfig) -> Dict[str, LoLDULayer]:
    """Wrappers around the target modules (the model is not touched yet)."""
    layers = {}
    for name, module, kind in targets:
        layers[name] = LAYER_CLASSES[kind](module, factors[name], config.torch_factor_dtype(module.weight.dtype))
    return layers


def commit(model: nn.Module, layers: Dict[str, LoLDULayer], adapter_name: str) -> None:
    """Freezes every parameter, swaps the wrappers in and activates `adapter_name`."""
    root = unwrap(model)
    saved = [(p, p.requires_grad) for p in root.parameters()]
    originals = []
    try:
        for name, layer in layers.items():
            parent, _, attr = name.rpartition(".")
            holder = root.get_submodule(parent)
            originals.append((holder, attr, getattr(holder, attr)))
            setattr(holder, attr, layer)
    except Exception:
        for holder, attr, module in reversed(originals):
            setattr(holder, attr, module)
        raise
    for p, _ in saved:
        p.requires_grad_(False)
    for layer in layers.values():
        layer.active_adapter = adapter_name
        layer.set_trainable(adapter_name)
    # A plain attribute (not a Module/Parameter), so it stays out of state_dict.
    object.__setattr__(root, _SAVED_FLAGS, saved)


def inject(model: nn.Module, config: LoLDUConfig, adapter_name: str = "default", *,
           progress: Optional[bool] = None) -> nn.Module:
    """Wraps every module `config.target_modules` selects and returns `model` (edited in place).

    Supported: nn.Linear, nn.Conv2d (groups=1), nn.Embedding, transformers Conv1D. The base weights
    are not rewritten; the adapter starts at c == 0, so outputs are unchanged. Afterwards only z
    (and sigma if config.train_scale) require grad. `progress`: tqdm bar (default: from 32 layers).
    Raises AdapterError naming the layer (unsupported type, rank too large, degenerate weight).
    With activation checkpointing, use non-reentrant checkpoints (transformers' default) or make the
    inputs require grad: a reentrant checkpoint whose inputs need no grad passes no gradient to z.
    """
    if not isinstance(config, LoLDUConfig):
        raise AdapterError(f"loldu.inject: config must be a LoLDUConfig, got {type(config).__name__}")
    _check_name(adapter_name)
    if adapted_layers(model):
        raise AdapterError("loldu.inject: the model already has LoLDU layers; use loldu.add_adapter for another adapter")
    targets = find_targets(model, config)
    factors = factorize(targets, config, progress=progress)
    layers = build_layers(targets, factors, config)
    for layer in layers.values():
        layer.add_adapter(adapter_name, config)
    commit(model, layers, adapter_name)
    return model


def adapter_names(model: nn.Module) -> List[str]:
    """Names of the model's adapters, in the order they were added."""
    return list(_layers_or_raise(model)[0][1].loldu_z.keys())


def active_adapter(model: nn.Module) -> Optional[str]:
    return _layers_or_raise(model)[0][1].active_adapter


def _check_compatible(model, layers, config: LoLDUConfig, what: str) -> None:
    """The adapter described by `config` must fit the factors the layers already share."""
    ref = layers[0][1].configs[next(iter(layers[0][1].configs))]
    for field in ("rank", "pivoting", "factor_dtype"):
        if getattr(config, field) != getattr(ref, field):
            raise AdapterError(f"{what}: {field}={getattr(config, field)!r} differs from the injected "
                               f"layers' {getattr(ref, field)!r}; adapters of one model share its frozen factors")
    adapted = {n for n, _ in layers}
    for name, _ in layers:
        if not config.matches(name):
            raise AdapterError(f"{what}: target_modules does not select LoLDU layer '{name}'; every adapter must "
                               "cover the same layers")
    for name, module in unwrap(model).named_modules():
        if name and config.matches(name) and name not in adapted and not any(name.startswith(a + ".") for a in adapted):
            raise AdapterError(f"{what}: target_modules selects '{name}', which has no LoLDU factors")


def add_adapter(model: nn.Module, adapter_name: str, config: Optional[LoLDUConfig] = None) -> nn.Module:
    """Adds adapter `adapter_name` (z = D, sigma = sigma0) to every LoLDU layer; not activated.

    It shares each layer's frozen factors: r + 1 new numbers per layer. `config` defaults to the
    active adapter's; its rank, pivoting and factor_dtype must match, and it must target the same layers.
    """
    layers = _layers_or_raise(model)
    _check_name(adapter_name)
    if adapter_name in layers[0][1].loldu_z:
        raise AdapterError(f"loldu.add_adapter: adapter {adapter_name!r} already exists")
    first = layers[0][1]
    if config is None:
        config = first.configs[first.active_adapter or next(iter(first.configs))]
    if not isinstance(config, LoLDUConfig):
        raise AdapterError(f"loldu.add_adapter: config must be a LoLDUConfig, got {type(config).__name__}")
    _check_compatible(model, layers, config, f"loldu.add_adapter({adapter_name!r})")
    for _, layer in layers:
        layer.add_adapter(adapter_name, config)
    return model


def _check_exists(layers, adapter_name, what):
    if adapter_name not in layers[0][1].loldu_z:
        raise AdapterError(f"{what}: no adapter {adapter_name!r}; adapters are {list(layers[0][1].loldu_z.keys())}")


def _check_unmerged(layers, what: str, state: str = "is merged") -> None:
    """Raises AdapterError naming the first merged layer: `what` needs the delta (unmerged) form."""
    merged = [n for n, layer in layers if layer.merged_adapter is not None]
    if merged:
        raise AdapterError(f"{what}: layer '{merged[0]}' {state}; call loldu.unmerge first")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes `adapter_name` the one the forward uses and the only one whose parameters train."""
    layers = _layers_or_raise(model)
    _check_exists(layers, adapter_name, "loldu.set_adapter")
    _check_unmerged(layers, "loldu.set_adapter")
    for _, layer in layers:
        layer.active_adapter = adapter_name
        layer.set_trainable(adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Removes adapter `adapter_name`; if it was active, the first remaining one becomes active."""
    layers = _layers_or_raise(model)
    _check_exists(layers, adapter_name, "loldu.delete_adapter")
    for n, layer in layers:
        if layer.merged_adapter == adapter_name:
            raise AdapterError(f"loldu.delete_adapter: adapter {adapter_name!r} is merged into layer '{n}'; unmerge first")
    if len(layers[0][1].loldu_z) == 1:
        raise AdapterError(f"loldu.delete_adapter: {adapter_name!r} is the only adapter; use loldu.unload")
    was_active = layers[0][1].active_adapter == adapter_name
    if was_active:  # checked before anything changes: the replacement cannot be activated while merged
        merged = [n for n, layer in layers if layer.merged_adapter is not None]
        if merged:
            raise AdapterError(f"loldu.delete_adapter: {adapter_name!r} is active and layer '{merged[0]}' is merged; "
                               "call loldu.unmerge first")
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    if was_active:
        set_adapter(model, next(iter(layers[0][1].loldu_z.keys())))
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters that require grad (what to give the optimizer): the active adapter's z (and sigma)."""
    return [p for p in model.parameters() if p.requires_grad]


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Prints PEFT's line 'trainable params: T || all params: A || trainable%: P'; returns (T, A)."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def merge(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Folds ΔW of `adapter_name` (default: the active one) into every base weight, in fp32, cast back.

    Afterwards the forward is the plain base modules' forward. Undo with loldu.unmerge.
    """
    layers = _layers_or_raise(model)
    name = adapter_name or layers[0][1].active_adapter
    _check_exists(layers, name, "loldu.merge")
    _check_unmerged(layers, "loldu.merge", "is already merged")
    # A tied weight (e.g. embedding and LM head), adapted or not on the other side, would receive ΔW
    # for every module that uses it: count each base weight's occurrences among all parameters.
    holders: Dict[int, List[str]] = {}
    for pn, p in unwrap(model).named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pn)
    for n, layer in layers:
        users = holders.get(id(layer.base_layer.weight), [])
        if len(users) > 1:
            tied = [m for m, l in layers if l.base_layer.weight is layer.base_layer.weight]
            raise AdapterError(f"loldu.merge: layers {', '.join(repr(m) for m in tied)}: weight is shared by "
                               f"{', '.join(users)} (tied weights; they share one weight tensor); merging would "
                               "change every module using it. Keep them unmerged (delta form)")
    for _, layer in layers:
        layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts the merged ΔW again (same fp32 ΔW, so weights return up to one rounding)."""
    for _, layer in _layers_or_raise(model):
        layer.unmerge()
    return model


def _strip(model: nn.Module) -> nn.Module:
    root = unwrap(model)
    for name, layer in adapted_layers(root):
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent), attr, layer.base_layer)
    for p, flag in root.__dict__.pop(_SAVED_FLAGS, []):
        p.requires_grad_(flag)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Puts the original modules back (unmerging first) and restores their requires_grad flags.

    The weights are the very tensors the model had: bit-identical unless it was merged meanwhile.
    """
    layers = _layers_or_raise(model)
    for _, layer in layers:
        layer.unmerge()
    return _strip(model)


def merge_and_unload(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Merges, then puts the plain modules (now holding W0 + ΔW) back: a model without loldu."""
    layers = _layers_or_raise(model)
    merged = {layer.merged_adapter for _, layer in layers if layer.merged_adapter is not None}
    if not merged:
        merge(model, adapter_name)
    elif adapter_name is not None and merged != {adapter_name}:
        raise AdapterError(f"loldu.merge_and_unload: adapter {sorted(merged)[0]!r} is merged, not {adapter_name!r}; "
                           "call loldu.unmerge first")
    return _strip(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with loldu.disabled(model):` the model computes its base outputs (unmerged models only)."""
    layers = _layers_or_raise(model)
    _check_unmerged(layers, "loldu.disabled")
    before = [layer.disabled for _, layer in layers]
    for _, layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for (_, layer), flag in zip(layers, before):
            layer.disabled = flag


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: Union[torch.Tensor, Sequence[Optional[str]]]) -> Iterator[nn.Module]:
    """Mixed batch: row i of every input uses its own adapter, in one forward.

    ids: adapter names (None = base model) of length batch, or an int tensor (batch,) indexing
    loldu.adapter_names(model), -1 = base model. Every adapted layer must see the batch as dim 0.
    """
    layers = _layers_or_raise(model)
    names = list(layers[0][1].loldu_z.keys())
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
    _check_unmerged(layers, "loldu.adapter_ids")
    before = [(layer._row_ids, layer._row_names) for _, layer in layers]  # an enclosing adapter_ids'
    for _, layer in layers:
        layer._row_ids, layer._row_names = idx.to(layer.loldu_D.device), names
    try:
        yield model
    finally:
        for (_, layer), (row_ids, row_names) in zip(layers, before):
            layer._row_ids, layer._row_names = row_ids, row_names
