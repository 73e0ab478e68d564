"""A model's adapters as one thing: which exist (with their configs), which is active, which is merged.

Every LoLDU layer holds its own tensors (z, sigma, the frozen factors, the merged c) and the
switches its forward reads (`active_adapter`, `merged_adapter`); the adapter names and configs are
the same on every layer of a model. AdapterState is the model-level owner of that bookkeeping: the
one place that reads it (from the first layer) and that changes it on all layers together, and it
holds the checks the model-level functions share (model.py, adapter_io.py, loldu.export). It stores
nothing itself, so it works on any module that holds the layers (a DDP or torch.compile wrapper,
a submodule, a deepcopy).
"""
import contextlib
from typing import Iterator, List, Optional, Tuple

import torch.nn as nn

from .config import LoLDUConfig
from .errors import AdapterError
from .heads import SavedModule, saved_modules
from .layer import LoLDULayer
from .targets import selector, walk


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers.

    Raises AdapterError when `model` is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"expected a model (a torch.nn.Module), got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif getattr(type(model), "_loldu_wrapper", False):  # loldu.LoLDUModel
            model = model.base_model
        else:
            return model


def adapted_layers(model: nn.Module) -> List[Tuple[str, LoLDULayer]]:
    """(name, layer) of every LoLDU layer, named as the wrapped module was in the base model."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoLDULayer)]


class AdapterState:
    """The adapters of `layers` ((name, LoLDULayer) pairs of one model, possibly none yet).

    `root` (the unwrapped model) is needed only by require_fits. `saved`: (name, SavedModule) of the
    modules trained fully beside the adapters (modules_to_save); every adapter has a copy in each.
    """

    def __init__(self, layers: List[Tuple[str, LoLDULayer]], root: Optional[nn.Module] = None,
                 saved: Optional[List[Tuple[str, SavedModule]]] = None):
        self.layers = layers
        self.root = root
        self.saved = saved if saved is not None else ([] if root is None else saved_modules(root))

    @classmethod
    def of(cls, model: nn.Module) -> "AdapterState":
        root = unwrap(model)
        return cls(adapted_layers(root), root)

    @property
    def switches(self) -> list:
        """Every module whose forward follows the active adapter: the LoLDU layers and the saved modules."""
        return [m for _, m in self.layers] + [m for _, m in self.saved]

    # -- what there is ----------------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        """Adapter names, in the order they were added."""
        return list(self.layers[0][1].loldu_z.keys())

    def config(self, name: str) -> LoLDUConfig:
        return self.layers[0][1].configs[name]

    @property
    def active(self) -> Optional[str]:
        return self.layers[0][1].active_adapter

    def first_merged(self) -> Optional[Tuple[str, str]]:
        """(layer name, adapter name) of the first merged layer, or None."""
        return next(((n, layer.merged_adapter) for n, layer in self.layers if layer.merged_adapter is not None), None)

    @property
    def merged(self) -> Optional[str]:
        """The adapter merged into the base weights, or None (at most one can be: merge needs an unmerged model)."""
        m = self.first_merged()
        return None if m is None else m[1]

    # -- checks -----------------------------------------------------------------------------------
    def require_layers(self, what: Optional[str] = None, error=AdapterError) -> "AdapterState":
        """Raises `error` when the model has no LoLDU layers; returns self."""
        if not self.layers:
            if what is None:
                raise error(f"{type(self.root).__name__} has no LoLDU layers; call loldu.inject first")
            raise error(f"{what}: the model has no LoLDU layers")
        return self

    def require_exists(self, name: str, what: str, error=AdapterError) -> None:
        if not isinstance(name, str):
            raise error(f"{what}: adapter_name must be a str, got {type(name).__name__} {name!r}; adapters are {self.names}")
        if name not in self.layers[0][1].loldu_z:
            raise error(f"{what}: no adapter {name!r}; adapters are {self.names}")

    def require_unmerged(self, what: str, state: str = "is merged", fix: str = "call loldu.unmerge first",
                         error=AdapterError) -> None:
        """Raises `error` naming the first merged layer: `what` needs the delta (unmerged) form."""
        m = self.first_merged()
        if m is not None:
            raise error(f"{what}: layer '{m[0]}' {state}; {fix}")

    def require_no_row_ids(self, what: str) -> None:
        """Raises AdapterError when a loldu.adapter_ids context is active: it holds the adapter names
        (and the layers) it was entered with, so they must not change until it is left."""
        if any(layer._row_ids is not None for _, layer in self.layers):
            raise AdapterError(f"{what}; leave the context first")

    def require_fits(self, config: LoLDUConfig, what: str) -> None:
        """The adapter described by `config` must fit the factors the layers already share."""
        ref = self.config(self.names[0])
        if not (config.per_layer or ref.per_layer) and config.rank != ref.rank:
            raise AdapterError(f"{what}: rank={config.rank!r} differs from the injected layers' {ref.rank!r}; "
                               "adapters of one model share its frozen factors")
        for field in ("pivoting", "factor_dtype", "factor_storage"):
            if getattr(config, field) != getattr(ref, field):
                raise AdapterError(f"{what}: {field}={getattr(config, field)!r} differs from the injected "
                                   f"layers' {getattr(ref, field)!r}; adapters of one model share its frozen factors")
        for name, layer in self.layers:  # per layer: rank="full" and rank_pattern spell ranks differently
            shape = tuple(layer.base_matrix().shape)
            r = config.rank_for(name, shape, layer.kind)
            if r != layer.rank:
                raise AdapterError(f"{what}: layer '{name}' {shape} would have rank {r} but its frozen factors have "
                                   f"rank {layer.rank}; adapters of one model share its frozen factors")
        selected = selector(self.root, config)
        for name, _ in self.layers:
            if not selected(name):
                raise AdapterError(f"{what}: target_modules does not select LoLDU layer '{name}'; every adapter must "
                                   "cover the same layers")
        adapted = {n for n, _ in self.layers}
        for name, _ in walk(self.root, lambda n, m: isinstance(m, LoLDULayer)):
            if selected(name) and name not in adapted:
                raise AdapterError(f"{what}: target_modules selects '{name}', which has no LoLDU factors")
        have = [n for n, _ in self.saved]
        missing = [n for n in have if not config.matches_saved(n)]
        if missing:
            raise AdapterError(f"{what}: modules_to_save/task_type do not select the saved module '{missing[0]}' that "
                               "the model's adapters train; every adapter must save the same modules")
        for name, _ in walk(self.root, lambda n, m: isinstance(m, (LoLDULayer, SavedModule))):
            if name not in have and config.matches_saved(name):
                raise AdapterError(f"{what}: modules_to_save/task_type select '{name}', which the model's adapters do "
                                   "not save; every adapter must save the same modules")

    # -- changes, on every layer ------------------------------------------------------------------
    def add(self, name: str, config: LoLDUConfig, values: Optional[dict] = None,
            saved_values: Optional[dict] = None, where: str = "") -> None:
        """Adds adapter `name`; `values`: layer name -> (z, sigma), default z = D and sigma = sigma0 (c == 0);
        `saved_values`: saved module name -> its state_dict, default a copy of the original module.
        The saved modules' copies are made (and checked) before any layer changes."""
        for n, layer in self.layers:  # each layer's initial scale is refused (naming it) before any change
            config.scale_for(n, layer.rank)
        copies = [(m, m.make_copy((saved_values or {}).get(n), where)) for n, m in self.saved]
        for n, layer in self.layers:
            layer.add_adapter(name, config, *(values[n] if values is not None else ()))
        for m, module in copies:
            m.add_adapter(name, module)

    def delete(self, name: str) -> None:
        for _, layer in self.layers:
            layer.delete_adapter(name)
        for _, m in self.saved:
            m.delete_adapter(name)

    def set_active(self, name: Optional[str], trainable: bool = True) -> None:
        """Makes `name` the adapter the forward uses and (with `trainable`) the only one whose parameters train."""
        for m in self.switches:
            m.active_adapter = name
            if trainable:
                m.set_trainable(name)

    @contextlib.contextmanager
    def using(self, name: Optional[str]) -> Iterator[None]:
        """`with state.using(name):` the forward uses adapter `name` (None: unchanged); restored after."""
        switches = self.switches
        before = [m.active_adapter for m in switches]
        try:
            if name is not None:
                self.set_active(name, trainable=False)
            yield
        finally:
            for m, a in zip(switches, before):
                m.active_adapter = a
