"""PEFT's model surface, natively: `loldu.get_loldu_model(model, config)` and `LoLDUModel.from_pretrained`.

PEFT (0.21) can host a new method only if its name is a member of `peft.PeftType`, a closed enum:
`register_peft_method` refuses any other name, so LoLDU cannot live inside PEFT without patching
PEFT's internals. LoLDUModel offers the same surface instead, with the same names and defaults
(`print_trainable_parameters`, `disable_adapter`, `merge_and_unload`, `save_pretrained`,
`from_pretrained(..., is_trainable=False)`, `set_adapter`, ...). It is a thin handle: the adapters
live in the wrapped model's modules, every loldu verb works on the wrapper or on the model inside
it, and attributes it does not define (`config`, `generate`, ...) are the wrapped model's.
"""
import contextlib
import inspect
import sys
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from . import adapter_io
from . import model as _model
from .config import LoLDUConfig
from .errors import AdapterError
from .state import AdapterState


class LoLDUModel(nn.Module):
    """A model with LoLDU adapters, with PEFT's PeftModel methods. Build it with loldu.get_loldu_model
    or LoLDUModel.from_pretrained; `base_model` is the wrapped model (edited in place)."""

    _loldu_wrapper = True  # loldu.state.unwrap looks through it

    def __new__(cls, base_model=None, *args, **kwargs):
        # Tools read a model's inputs off its class's forward signature (transformers.Trainer keeps only
        # the dataset columns it names, finds the labels there and decides whether the model returns a
        # loss); a wrapper with forward(*args, **kwargs) would show them nothing. So each wrapped class
        # gets a LoLDUModel subclass whose forward has that class's signature, as PEFT's task classes do.
        if cls is LoLDUModel and isinstance(base_model, nn.Module):
            cls = _typed_wrapper(type(base_model))
        return super().__new__(cls)

    def __init__(self, base_model: nn.Module):
        super().__init__()
        if not isinstance(base_model, nn.Module):
            raise AdapterError(f"LoLDUModel: expected a torch.nn.Module, got {type(base_model).__name__}")
        self.base_model = base_model

    def __reduce_ex__(self, protocol):
        # The typed subclass exists only in the process that made it: pickle the handle as its parts.
        return _rewrap, (self.base_model, self.training)

    def train(self, mode: bool = True) -> "LoLDUModel":
        """nn.Module.train; refused (AdapterError) when the plain transformers.Trainer calls it, which would
        write each checkpoint as the whole model's state dict instead of the adapter (docs/trainer.md)."""
        if mode:
            _refuse_plain_trainer(sys._getframe(1))
        return super().train(mode)

    # -- PEFT's constructors --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, adapter_name: Optional[str] = None, *,
                        is_trainable: bool = False, **kwargs) -> "LoLDUModel":
        """Loads the adapter saved in `directory` (save_pretrained / loldu.save_adapter) into `model`.

        is_trainable: False (PEFT's default) loads it for inference, frozen; True to train it further.
        Other keyword arguments are those of loldu.load_adapter (progress, check_calls).
        """
        adapter_io.load_adapter(model, directory, adapter_name, is_trainable=is_trainable, **kwargs)
        return cls(model)

    # -- forwarding -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (base_model)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoLDU layers)."""
        return self.base_model

    # -- adapters -------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> Optional[str]:
        return _model.active_adapter(self.base_model)

    @property
    def active_adapters(self):
        return [self.active_adapter]

    @property
    def peft_config(self) -> Dict[str, LoLDUConfig]:
        """adapter name -> its LoLDUConfig (PEFT's attribute name)."""
        state = AdapterState.of(self.base_model).require_layers()
        return {n: state.config(n) for n in state.names}

    def add_adapter(self, adapter_name: str, config: Optional[LoLDUConfig] = None) -> None:
        _model.add_adapter(self.base_model, adapter_name, config)

    def set_adapter(self, adapter_name: str) -> None:
        _model.set_adapter(self.base_model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        _model.delete_adapter(self.base_model, adapter_name)

    def load_adapter(self, directory, adapter_name: Optional[str] = None, *, is_trainable: bool = False,
                     **kwargs) -> None:
        """Adds the adapter saved in `directory` under `adapter_name` (not activated; set_adapter)."""
        adapter_io.load_adapter(self.base_model, directory, adapter_name, is_trainable=is_trainable, **kwargs)

    def save_pretrained(self, save_directory, adapter_name: Optional[str] = None, *, is_main_process: bool = True,
                        **kwargs) -> Dict[str, int]:
        """Writes the adapter (default: the active one) into `save_directory`: loldu.save_adapter.

        is_main_process=False (PEFT's and transformers' spelling, for every process but one in a distributed
        run) writes nothing and returns {}: z, sigma and the pivots are whole on every rank, also on a
        model sharded with fully_shard, so one process saves the whole adapter (docs/distributed.md).
        PEFT's and transformers' other keyword arguments (safe_serialization, state_dict, ...) do not
        apply to a loldu adapter file and are refused, so nothing is silently ignored.
        """
        if kwargs:
            raise AdapterError(f"LoLDUModel.save_pretrained: unsupported arguments {sorted(kwargs)} (a loldu adapter is "
                               "always one safetensors file holding only the adapter)")
        if not is_main_process:
            return {}
        return adapter_io.save_adapter(self.base_model, save_directory, adapter_name)

    def print_trainable_parameters(self) -> Tuple[int, int]:
        """PEFT's line of parameter counts, then the active adapter's suggested learning rate."""
        counts = _model.print_trainable_parameters(self.base_model)
        config = AdapterState.of(self.base_model).config(self.active_adapter)
        print(f"suggested learning rate: {config.suggested_lr:g} (LoLDUConfig.suggested_lr: one rate for z, sigma and "
              "the heads; docs/evaluation.md)")
        return counts

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of that name."""
        return _model.parameter_counts(self.base_model)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[nn.Module]:
        """`with model.disable_adapter():` the base model's outputs."""
        with _model.disabled(self.base_model):
            yield self

    def merge_adapter(self, adapter_name: Optional[str] = None) -> None:
        _model.merge(self.base_model, adapter_name)

    def unmerge_adapter(self) -> None:
        _model.unmerge(self.base_model)

    def merge_and_unload(self, adapter_name: Optional[str] = None) -> nn.Module:
        """Folds the adapter into the weights and returns the plain model (without loldu)."""
        return _model.merge_and_unload(self.base_model, adapter_name)

    def unload(self) -> nn.Module:
        """Returns the plain base model, the adapters removed (unmerged first)."""
        return _model.unload(self.base_model)


_TYPED: Dict[type, type] = {}


def _typed_wrapper(base_cls: type) -> type:
    """The LoLDUModel subclass for models of class `base_cls`: its forward has base_cls.forward's signature."""
    sub = _TYPED.get(base_cls)
    if sub is None:
        def forward(self, *args, **kwargs):
            return self.base_model(*args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_cls.forward)
        except (TypeError, ValueError):  # a forward without a readable signature: keep (*args, **kwargs)
            pass
        forward.__doc__ = base_cls.forward.__doc__
        sub = _TYPED[base_cls] = type(LoLDUModel.__name__, (LoLDUModel,), {
            "forward": forward, "__module__": LoLDUModel.__module__, "__qualname__": LoLDUModel.__qualname__})
    return sub


def _rewrap(base_model: nn.Module, training: bool) -> LoLDUModel:
    wrapper = LoLDUModel(base_model)
    wrapper.training = training  # the handle's own flag only: base_model's modules kept theirs
    return wrapper


def _refuse_plain_trainer(frame, depth: int = 8) -> None:
    """AdapterError when a method of a transformers Trainer without loldu's mixin is among the first
    `depth` callers: it would train, then save every checkpoint as the whole model."""
    trainer_mod = sys.modules.get("transformers.trainer")
    if trainer_mod is None:
        return
    from .trainer import LoLDUTrainerMixin  # transformers is imported, so loldu.trainer imports

    while frame is not None and depth > 0:
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_mod.Trainer):
            if isinstance(owner, LoLDUTrainerMixin):
                return
            raise AdapterError(
                f"{type(owner).__name__} is transformers' plain Trainer, which saves a LoLDU model as a whole-model "
                "state dict (every base weight, under LoLDU's wrapped names) that from_pretrained and "
                "loldu.load_adapter cannot use; train with loldu.trainer.LoLDUTrainer (the same arguments; for "
                "another Trainer subclass, mix in loldu.trainer.LoLDUTrainerMixin first): its checkpoints "
                "are the adapter file (docs/trainer.md)")
        frame, depth = frame.f_back, depth - 1


def _plain_trainer_pre_hook(module: nn.Module, args) -> None:
    # A module-level function, so that an injected model still pickles (torch.save) with the hook on.
    if module.training and torch.is_grad_enabled():
        _refuse_plain_trainer(sys._getframe(1))


def arm_plain_trainer_check(root: nn.Module):
    """For a model injected in place (no LoLDUModel handle to refuse it): a forward pre-hook on `root`
    that refuses its training forwards under the plain transformers Trainer, before the first step.
    Returns the hook's handle (remove it when the adapters are unloaded)."""
    return root.register_forward_pre_hook(_plain_trainer_pre_hook)


def get_loldu_model(model: nn.Module, config: LoLDUConfig, adapter_name: str = "default", **kwargs) -> LoLDUModel:
    """PEFT's get_peft_model for LoLDU: injects `config` into `model` (loldu.inject, same keyword
    arguments) and returns it wrapped in a LoLDUModel."""
    return LoLDUModel(_model.inject(model, config, adapter_name, **kwargs))
