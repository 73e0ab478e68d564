"""Modules trained fully beside an adapter and saved whole with it (`modules_to_save`, PEFT's name).

A freshly initialised task head (a `classifier` on a pretrained encoder) has nothing to factorize
and must be trained outright. `SavedModule` wraps such a module: the original stays untouched as
`original_module`, and every adapter gets its own trainable copy in `modules_to_save[name]`, which
the forward runs while that adapter is active. Disabled adapters, or no active adapter, run the
original. The adapter file stores the active copy's state_dict (adapter_io.py), so a head trained
with an adapter is loaded with it.
"""
import copy
from typing import Dict, Optional

import torch
import torch.nn as nn

from .errors import AdapterError


class SavedModule(nn.Module):
    """`original_module` plus one trainable copy per adapter (see the module docstring)."""

    def __init__(self, original: nn.Module, name: str = ""):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.layer_name = name
        self.active_adapter: Optional[str] = None
        self.disabled = False

    # -- adapters ---------------------------------------------------------------------------------
    def make_copy(self, values: Optional[Dict[str, torch.Tensor]] = None, where: str = "") -> nn.Module:
        """A frozen copy of the original, with `values` (a full state_dict of it) loaded when given.

        Raises AdapterError naming the module when `values` does not fit it (missing, unexpected or
        mis-shaped tensors); the original is untouched either way."""
        module = copy.deepcopy(self.original_module)
        if values is not None:
            expected = module.state_dict()
            missing = sorted(set(expected) - set(values))
            extra = sorted(set(values) - set(expected))
            if missing or extra:
                raise AdapterError(f"{where}module '{self.layer_name}' ({type(module).__name__}): the saved tensors "
                                   f"do not fit it (missing {missing}, unexpected {extra})")
            for key, t in values.items():
                if tuple(t.shape) != tuple(expected[key].shape) or t.dtype != expected[key].dtype:
                    raise AdapterError(f"{where}module '{self.layer_name}': tensor '{key}' is {t.dtype} "
                                       f"{tuple(t.shape)} in the file but {expected[key].dtype} "
                                       f"{tuple(expected[key].shape)} in the model")
            module.load_state_dict(values)
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def add_adapter(self, name: str, module: nn.Module) -> None:
        self.modules_to_save[name] = module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_trainable(self, name: Optional[str]) -> None:
        """Only adapter `name`'s copy trains (every parameter of it)."""
        for n, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(n == name)

    @property
    def current(self) -> nn.Module:
        """The module the forward runs now: the active adapter's copy, or the original."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current(*args, **kwargs)

    # Code that reads a head's weight (e.g. to tie or inspect it) sees the module the forward runs.
    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.current, "weight", None)
        if w is None:
            raise AttributeError(f"{type(self.current).__name__} '{self.layer_name}' has no weight")
        return w

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.current, "bias", None)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save.keys())}, active={self.active_adapter!r}"


def saved_modules(root: nn.Module):
    """(name, SavedModule) of every saved module in `root`, in module order."""
    return [(n, m) for n, m in root.named_modules() if isinstance(m, SavedModule)]
