"""The transformers Trainer with LoLDU adapters: adapter-only checkpoints that resume and load.

The plain `transformers.Trainer` saves an injected model whole (`model.safetensors` with the
wrapped names `...base_layer.weight`, `...loldu_z.default`), a copy of the base model that plain
`from_pretrained` cannot read. Trainer special-cases PEFT's `PeftModel` when it saves and loads;
a LoLDU model is an ordinary `PreTrainedModel` with LoLDU layers inside, so the same treatment
comes from `LoLDUTrainerMixin`, which replaces the three places where Trainer writes or reads model
weights:

- `_save` (every `checkpoint-N/`, `save_model()`, the final `output_dir`): `loldu.save_adapter`
  writes the active adapter (`adapter_model.safetensors`: z, sigma, the pivots, the base weights'
  fingerprints, and the modules_to_save / task heads whole; `loldu_config.json`, a readable copy of
  its config), next to the processing class and `training_args.bin`. Trainer adds its own state
  files to checkpoints (optimizer, scheduler, rng, `trainer_state.json`). No base weight is written.
- `_load_from_checkpoint` (`train(resume_from_checkpoint=...)`) and `_load_best_model`
  (`load_best_model_at_end=True`): `restore_adapter` copies the saved values into the model's
  active adapter in place, after checking the checkpoint against the model (same layers, base
  weights by fingerprint, rank, scale settings, saved modules). The parameters stay the same
  objects and keep their requires_grad flags, so an optimizer that already holds them (Trainer's
  own, or one given as `optimizers=`) stays valid, and Trainer then restores its state.
  A checkpoint directory without an adapter file (one the plain Trainer wrote) is handed to
  Trainer's own loader.
- `train(resume_from_checkpoint=True)` resumes from the newest complete checkpoint-N: one that a
  kill left incomplete (an empty directory, an adapter without Trainer's trainer_state.json, which
  Trainer writes last, or a file there that is not a regular file) is skipped with a LolduWarning
  (`last_complete_checkpoint`); plain Trainer would pick it and refuse it on every resume.

For a `loldu.LoLDUModel` handle (loldu.get_loldu_model), the mixin also makes Trainer read the input
names, labels and loss arguments off the wrapped model, as Trainer does for PeftModel.

A checkpoint directory is an adapter directory: `loldu.load_adapter(base_model, "out/checkpoint-N")`
loads it for inference. See docs/trainer.md.
"""
import contextlib
import dataclasses
import inspect
import json
import os
import stat
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .adapter_io import WEIGHTS_NAME, load_adapter, read_adapter, save_adapter
from .atomic import read_regular
from .distributed import is_sharded, settle
from .errors import AdapterError, LolduWarning
from .model import delete_adapter
from .state import AdapterState, unwrap

try:
    from transformers import Trainer
    from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import can_return_loss, find_labels
except ImportError as _e:  # pragma: no cover - transformers is a test dependency
    raise ImportError("loldu.trainer needs transformers (and accelerate): pip install transformers accelerate") from _e

__all__ = ["LoLDUTrainerMixin", "LoLDUTrainer", "restore_adapter", "is_adapter_checkpoint", "last_complete_checkpoint"]

# The config field that only chooses how the layers compute (docs/method.md §7), not what z and sigma
# mean: a checkpoint restores into an adapter that differs in it.
_COMPUTE_ONLY = ("form",)


# The most bytes a trainer_state.json may have to be read while looking for a complete checkpoint.
_STATE_MAX = 256 << 20


def is_adapter_checkpoint(directory) -> bool:
    """Whether `directory` holds a loldu adapter file (adapter_model.safetensors). Anything by that
    name counts (a FIFO too): loldu's reader then refuses what is not a regular adapter file."""
    return os.path.lexists(os.path.join(os.fspath(directory), WEIGHTS_NAME))


def _incomplete(path: str) -> Optional[str]:
    """Why checkpoint directory `path` cannot be resumed from, or None: Trainer writes its
    trainer_state.json last, so without a readable one the save did not finish; an adapter file
    there must be a regular file."""
    weights = os.path.join(path, WEIGHTS_NAME)
    try:
        if os.path.lexists(weights) and not stat.S_ISREG(os.stat(weights).st_mode):
            return f"{WEIGHTS_NAME} is not a regular file"
        state = json.loads(read_regular(os.path.join(path, TRAINER_STATE_NAME), _STATE_MAX))
    except OSError as e:
        return f"no readable {TRAINER_STATE_NAME} ({e.strerror or e})"
    except (ValueError, RecursionError):
        return f"{TRAINER_STATE_NAME} is not valid JSON"
    return None if isinstance(state, dict) else f"{TRAINER_STATE_NAME} is not a JSON object"


def last_complete_checkpoint(output_dir) -> Optional[str]:
    """The newest checkpoint-N directory of `output_dir` that a resume can use (None if there is no
    checkpoint-N at all). Newer ones that a kill left incomplete (`_incomplete`) are skipped with a
    LolduWarning; AdapterError when every checkpoint is incomplete."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    numbered = []
    for n in names:
        head, _, num = n.partition("-")
        if head == PREFIX_CHECKPOINT_DIR and num.isascii() and num.isdigit() and os.path.isdir(os.path.join(output_dir, n)):
            numbered.append((int(num), n))
    skipped = []
    for _, n in sorted(numbered, reverse=True):
        path = os.path.join(output_dir, n)
        why = _incomplete(path)
        if why is None:
            if skipped:
                warnings.warn(f"loldu.trainer: resuming from {path}; skipped the newer incomplete checkpoint(s) "
                              + ", ".join(f"{p} ({w})" for p, w in skipped) + ": a save was interrupted",
                              LolduWarning, stacklevel=3)
            return path
        skipped.append((n, why))
    if skipped:
        raise AdapterError(f"loldu.trainer: no complete checkpoint to resume from in {os.fspath(output_dir)!r}: "
                           + ", ".join(f"{p} ({w})" for p, w in skipped))
    return None


def restore_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> nn.Module:
    """Copies the adapter saved in `directory` into adapter `adapter_name` (default: the active one)
    of `model`, in place, and returns `model`: z, sigma and the saved modules' (task heads') tensors.

    This is how training resumes: the model's parameters stay the same objects (an optimizer holding
    them stays valid) and keep their requires_grad flags. The file goes through the same checks as
    `loldu.load_adapter` (its layers are the model's, on the same base weights by fingerprint, with the
    same rank and saved modules), and its config must equal the adapter's but for `form`, which only
    chooses how the layers compute (alpha, sigma0 and train_scale change what z and sigma mean).
    Raises AdapterError naming the directory; the model is then unchanged.
    """
    where = f"loldu.trainer.restore_adapter({str(directory)!r})"
    state = AdapterState.of(model).require_layers(where)
    name = adapter_name if adapter_name is not None else state.active
    if name is None:
        raise AdapterError(f"{where}: the model has no active adapter; pass adapter_name")
    state.require_exists(name, where)
    state.require_unmerged(where, fix="call loldu.unmerge before restoring into it")
    stored = read_adapter(directory)  # read and hashed once: load_adapter below takes it as read
    mine, theirs = state.config(name), stored.config
    differ = [f.name for f in dataclasses.fields(mine) if not f.name.startswith("_") and f.name not in _COMPUTE_ONLY
              and getattr(mine, f.name) != getattr(theirs, f.name)]
    if differ:
        raise AdapterError(
            f"{where}: the saved adapter's config differs from the model's adapter {name!r} in "
            + ", ".join(f"{k} ({getattr(theirs, k)!r} saved, {getattr(mine, k)!r} in the model)" for k in differ)
            + "; resume with the LoLDUConfig the checkpoint was trained with")
    scratch, i = "_loldu_restore", 0
    while scratch in state.names:
        i += 1
        scratch = f"_loldu_restore{i}"
    # Loaded as an extra, inactive adapter: every check of load_adapter runs (layers, base weights by
    # fingerprint, saved modules), and a refusal leaves the model unchanged. Its values are then copied
    # over and it is deleted again.
    load_adapter(model, stored, adapter_name=scratch)
    try:
        state = AdapterState.of(model)
        with torch.no_grad():
            for _, layer in state.layers:
                layer.loldu_z[name].copy_(layer.loldu_z[scratch])
                layer.loldu_sigma[name].copy_(layer.loldu_sigma[scratch])
            for _, saved in state.saved:
                target = dict(saved.modules_to_save[name].state_dict(keep_vars=True))
                for key, t in saved.modules_to_save[scratch].state_dict().items():
                    target[key].copy_(t)
    finally:
        delete_adapter(model, scratch)
    return model


def _fsdp2_sharded(model: nn.Module) -> bool:
    """Whether the model holds parameters sharded by FSDP2 (DTensors): it was fully_shard'ed before inject."""
    return any(is_sharded(p) for p in model.parameters())


class LoLDUTrainerMixin:
    """Mixed in before a transformers Trainer class (`class T(LoLDUTrainerMixin, Trainer)`, or before
    a subclass such as TRL's trainers): checkpoints hold the active LoLDU adapter only, and resuming
    and `load_best_model_at_end` restore it in place (see the module docstring).

    The model must be injected (loldu.inject / loldu.load_adapter(..., is_trainable=True)) and not
    merged; an AdapterError says so at construction. Only the active adapter is saved and restored.
    """

    def __init__(self, *args, **kwargs):
        what = f"{type(self).__name__}"
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # checked before Trainer touches it (a model_init's model: after)
            self._check_model(model, what)
        super().__init__(*args, **kwargs)
        if model is None:
            self._check_model(self.model, what)
        if getattr(self, "is_deepspeed_enabled", False):
            # ZeRO-3 partitions parameters behind its own hooks, which LoLDU's factorization cannot read.
            raise AdapterError(f"{what}: DeepSpeed is not supported (ZeRO-3 partitions the base weights where the "
                               "factorization cannot read them, and its checkpoints bypass the adapter files). Shard "
                               "with FSDP2 instead: torch.distributed.fsdp.fully_shard, then loldu.inject, then "
                               "this trainer without fsdp arguments (docs/distributed.md); or DDP (torchrun)")
        if getattr(self, "is_fsdp_enabled", False):
            # Accelerate would shard after the adapter exists: the frozen factors, buffers, stay whole on every rank.
            raise AdapterError(f"{what}: Trainer's fsdp arguments (accelerate's FSDP plugin) shard the model after "
                               "LoLDU was injected, which leaves the frozen factors whole on every rank. Shard first: "
                               "torch.distributed.fsdp.fully_shard on the base model, then loldu.inject, then this "
                               "trainer without fsdp arguments (docs/distributed.md)")
        if _fsdp2_sharded(self.model):
            # Like a model sharded at load time (transformers' DistributedConfig): no DDP wrap, no new sharding.
            self.is_distributed_loading_by_transformers = True
        inner = unwrap(self.model)
        if inner is not self.model:
            # A loldu.LoLDUModel handle: Trainer reads the labels, loss and input names off the model's class
            # and forward signature, which are the wrapped model's (as Trainer does for PEFT's PeftModel).
            forward = inspect.signature(inner.forward).parameters.values()
            self.model_accepts_loss_kwargs = getattr(
                inner, "accepts_loss_kwargs", any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward))
            if self.args.label_names is None:
                self.label_names = find_labels(inner.__class__)
            self.can_return_loss = can_return_loss(inner.__class__)

    @staticmethod
    def _check_model(model: nn.Module, what: str) -> None:
        state = AdapterState.of(model).require_layers(f"{what}: the model to train")
        state.require_unmerged(f"{what}: the model to train", fix="call loldu.unmerge before training")
        if state.active is None:
            raise AdapterError(f"{what}: the model has no active adapter; call loldu.set_adapter")

    def _sync_replicated_trainable_parameters(self, model: nn.Module) -> None:
        """A sharded model's z and sigma already average their gradients (loldu.distributed.settle, the
        same on every rank since inject); Trainer's own hook (ReduceOp.AVG) would not run on gloo."""
        settle(model)

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Gradient accumulation on a sharded LoLDU model: the base weights are frozen (FSDP2 reduces no
        gradient) and z and sigma average theirs at once, so there is nothing to defer."""
        yield

    def _set_signature_columns_if_needed(self) -> None:
        """The input names Trainer keeps (remove_unused_columns): those of the wrapped model's forward."""
        if self._signature_columns is None:
            names = list(inspect.signature(unwrap(self.model).forward).parameters)
            self._signature_columns = names + list({"label", "label_ids", *self.label_names})

    def train(self, *args, **kwargs):
        """Trainer.train, refused up front (AdapterError) when no parameter of the model requires grad:
        an adapter loaded with loldu.load_adapter's default is_trainable=False is frozen."""
        if not any(p.requires_grad for p in self.model.parameters()):
            state = AdapterState.of(self.model)
            raise AdapterError(f"{type(self).__name__}.train: nothing to train, adapter {state.active!r} is frozen "
                               "(loldu.load_adapter loads for inference unless is_trainable=True)")
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:  # Trainer would take the newest checkpoint-N, even one a kill left incomplete
            last = last_complete_checkpoint(self.args.output_dir)
            if last is not None:
                if args:
                    args = (last,) + tuple(args[1:])
                else:
                    kwargs["resume_from_checkpoint"] = last
        return super().train(*args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.model, output_dir)  # creates the directory; AdapterError naming it if it cannot
        # The processing class, else the collator's tokenizer: what Trainer's own _save writes.
        processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if not is_adapter_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapter(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not is_adapter_checkpoint(best):
            return super()._load_best_model()
        restore_adapter(self.model, best)


class LoLDUTrainer(LoLDUTrainerMixin, Trainer):
    """`transformers.Trainer` for a model with a LoLDU adapter: adapter-only checkpoints (see LoLDUTrainerMixin)."""
