"""Which modules an adapter goes onto (target_modules) and which are trained whole beside it (modules_to_save).

Every function here takes the model itself (loldu.state.unwrap looks through DDP and compile
wrappers) and only reads it. target_modules="all-linear" is expanded once, per model, into the
names it stands for (all_linear); after that every form is matched by name (selector).
"""
import difflib
import re
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .callcheck import runs
from .config import ALL_LINEAR, TASK_HEADS, LoLDUConfig, key_matches
from .errors import AdapterError, LolduWarning
from .heads import SavedModule
from .kinds import warn_batched_weights
from .layer import LoLDULayer, check_supported, kind_of

# (name, module, kind) of the modules an adapter goes onto; what inject_with/add_with give `check`.
Targets = List[Tuple[str, nn.Module, str]]
# Names of task heads: target_modules='all-linear' never adapts them (a fresh head has nothing to factorize).
HEADS = sorted({n for names in TASK_HEADS.values() for n in names})
# The module kinds target_modules='all-linear' selects (loldu.layer.kind_of).
LINEAR_KINDS = ("linear", "conv1d")


# torch.nn modules that read a child Linear's weight instead of calling the child, so a LoLDU layer
# there would be silently ignored: (parent class, child attribute, why, refuse even if a subclass
# overrides forward). A subclass with its own forward is otherwise left to the run-time check
# (loldu.callcheck.CallCheck), which sees a bypass in every forward but not one that depends on the mode (an
# inference fast path), so those are refused for every subclass. (nn.MultiheadAttention's packed
# in_proj_weight and its q/k/v_proj_weight are Parameters, not modules: target_modules never sees them.)
_IGNORED = "its adapter would get no gradient and be ignored, yet merge would change the outputs"
_BYPASSED_CHILDREN = [
    (nn.MultiheadAttention, "out_proj", "nn.MultiheadAttention passes out_proj.weight and out_proj.bias to "
     f"F.multi_head_attention_forward instead of calling out_proj: {_IGNORED}", False),
    *((nn.TransformerEncoderLayer, lin, f"nn.TransformerEncoderLayer's inference fast path (eval mode without grad) "
       f"passes {lin}.weight to torch._transformer_encoder_layer_fwd instead of calling {lin}: its adapter would "
       "be ignored at inference unless merged", True) for lin in ("linear1", "linear2")),
]
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
    _BYPASSED_CHILDREN.append((nn.LinearCrossEntropyLoss, "linear", "nn.LinearCrossEntropyLoss reshapes "
                               f"linear.weight for F.linear_cross_entropy instead of calling linear: {_IGNORED}", False))


def _bypass_reason(parent: nn.Module, attr: str) -> Optional[str]:
    """Why `parent` never calls its child `attr` (it reads the child's weight instead), or None."""
    for cls, child, why, any_subclass in _BYPASSED_CHILDREN:
        if attr == child and isinstance(parent, cls) and (any_subclass or type(parent).forward is cls.forward):
            return why
    return None


def walk(root: nn.Module, opaque: Callable[[str, nn.Module], bool]) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of root's named modules (root itself left out), not descending into a module
    `opaque(name, module)` is true for (which is still yielded)."""
    skip = None
    for name, module in root.named_modules():  # pre-order: a module's descendants follow it directly
        if not name or (skip is not None and name.startswith(skip)):
            continue
        if opaque(name, module):
            skip = name + "."
        yield name, module


def _output_head(root: nn.Module) -> Optional[nn.Module]:
    """A transformers model's output layer (the LM head), which target_modules='all-linear' leaves out
    (the module a LoLDU layer there wraps)."""
    get = getattr(root, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    if isinstance(head, LoLDULayer):
        head = head.base_layer
    return head if isinstance(head, nn.Module) else None


def all_linear(root: nn.Module, config: LoLDUConfig) -> List[str]:
    """The names target_modules='all-linear' stands for in `root` (PEFT's rule): every nn.Linear and
    transformers Conv1D but the output head (`get_output_embeddings()`), the task heads (HEADS), the
    saved modules (config.saved_modules, and what they hold) and linears their parent never calls
    (nn.MultiheadAttention.out_proj, ...). A LoLDU layer counts as the module it wraps, so a model
    with adapters expands as its base model does."""
    def left_out(name: str, module: nn.Module) -> bool:
        return isinstance(module, SavedModule) or config.matches_saved(name)

    head = _output_head(root)
    names = []
    for name, module in walk(root, lambda n, m: isinstance(m, LoLDULayer) or left_out(n, m)):
        if left_out(name, module):
            continue
        if isinstance(module, LoLDULayer):
            module = module.base_layer
        parent, _, leaf = name.rpartition(".")
        if kind_of(module) in LINEAR_KINDS and module is not head and leaf not in HEADS \
                and _bypass_reason(root.get_submodule(parent), leaf) is None:
            names.append(name)
    return names


def selector(root: nn.Module, config: LoLDUConfig) -> Callable[[str], bool]:
    """Whether config.target_modules selects the module called `name` in `root`: a list or a regex by
    name (LoLDUConfig.matches), 'all-linear' by the names all_linear expands it to here; then, with
    layers_to_transform, only those in the layers it lists."""
    by_name = frozenset(all_linear(root, config)).__contains__ if config.target_modules == ALL_LINEAR else config.matches
    if config.layers_to_transform is None:
        return by_name
    return lambda name: by_name(name) and config.in_layers(name)  # PEFT's layer filter (LoLDUConfig.in_layers)


def _supported(name: str, module: nn.Module) -> str:
    """check_supported, with a PEFT tuner layer (a LoRA-wrapped Linear: its class is also named
    Linear) named as what it is."""
    inner = getattr(module, "base_layer", None)
    if kind_of(module) is None and type(module).__module__.startswith("peft.") and isinstance(inner, nn.Module):
        raise AdapterError(
            f"layer '{name}' is wrapped by PEFT ({type(module).__module__}.{type(module).__name__} around "
            f"{type(inner).__name__}); LoLDU adapts plain modules: merge the PEFT adapter into the base first "
            "(peft_model.merge_and_unload(), or unload() to drop it), then inject LoLDU")
    return check_supported(name, module)


def find_targets(root: nn.Module, config: LoLDUConfig) -> Targets:
    """(name, module, kind) of every module `config` targets, outside existing LoLDU layers and saved modules.

    target_modules="all-linear" selects what all_linear lists: linears their parent never calls
    (nn.MultiheadAttention.out_proj, ...) are skipped, a task head nothing trains gets a LolduWarning.
    A list entry that matches no module gets a LolduWarning (with the closest module names).
    Raises AdapterError for a module its parent does not call (e.g. nn.MultiheadAttention.out_proj)
    and for a target registered under two names.
    """
    selected = selector(root, config)
    found = [(name, module, _supported(name, module))
             for name, module in walk(root, lambda n, m: isinstance(m, (LoLDULayer, SavedModule)))
             if not isinstance(module, (LoLDULayer, SavedModule)) and selected(name)]
    _check_registered_once(root, selected)
    if not found:
        hints = _unmatched(root, config.target_modules) if isinstance(config.target_modules, list) else []
        if isinstance(config.target_modules, str) and config.target_modules != ALL_LINEAR:
            hints = [_regex_hint(root, config.target_modules)]
        if config.layers_to_transform is not None:
            hints.append(f"with layers_to_transform={config.layers_to_transform} and layers_pattern="
                         f"{config.layers_pattern} (the layer number is read as LoLDUConfig.in_layers says)")
        raise AdapterError(f"target_modules={config.target_modules!r} matches no module of {type(root).__name__}"
                           + (f" ({'; '.join(hints)})" if hints else ""))
    if isinstance(config.target_modules, list):
        _warn_unmatched(root, config.target_modules, "target_modules")
    if config.target_modules == ALL_LINEAR:
        _warn_unsaved_heads(root, config, found)
        warn_batched_weights(root, "target_modules='all-linear'", stacklevel=4)
    for name, _, _ in found:
        _check_not_bypassed(root, name, config, len(found))
    _check_patterns_used(root, config, [name for name, _, _ in found])
    return found


def _check_patterns_used(root: nn.Module, config: LoLDUConfig, names: List[str]) -> None:
    """Every rank_pattern / alpha_pattern key must select a target: PEFT ignores such a key, so a typo
    silently keeps the default rank; refused here (naming the key) before anything changes."""
    for what in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, what) or {}
        used = {config.pattern_key(pattern, n) for n in names}
        for key in pattern:
            if key not in used:
                close = difflib.get_close_matches(key.rpartition(".")[2], sorted({n.rpartition(".")[2] for n in names}), n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                shadow = [n for n in names if key_matches(key, n)]
                if shadow:
                    hint = f" (an earlier key selects every layer it matches, e.g. '{shadow[0]}')"
                raise AdapterError(f"{what} key {key!r} selects none of the {len(names)} adapted layers of "
                                   f"{type(root).__name__}{hint}; the key must equal a layer's name, end it after a "
                                   "'.', or match it whole as a regular expression")


def _check_registered_once(root: nn.Module, selected: Callable[[str], bool]) -> None:
    """A target registered in two places (`model.dec = model.enc`) would be swapped for its LoLDU layer
    in one of them only, so calls through the other would silently run without the adapter: refused
    when any of its names is targeted. (A shared parent is fine: the layer replaces the child in the
    one parent object all its names reach.)"""
    names: Dict[int, List[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if name and not isinstance(module, LoLDULayer):
            names.setdefault(id(module), []).append(name)
    for all_names in names.values():
        if len(all_names) < 2 or not any(selected(n) for n in all_names):
            continue
        slots: Dict[Tuple[int, str], str] = {}
        for n in all_names:
            parent, _, attr = n.rpartition(".")
            slots.setdefault((id(root.get_submodule(parent)), attr), n)
        name, *others = slots.values()
        if others:
            raise AdapterError(
                f"layer '{name}' is also registered as {', '.join(repr(n) for n in others)} (one module object under "
                f"two names): LoLDU would replace it under '{name}' only, so calls through "
                f"{', '.join(repr(n) for n in others)} would run without the adapter. Give each name its own module "
                "(e.g. copy.deepcopy) or leave it out of target_modules")


def _check_not_bypassed(root: nn.Module, name: str, config: LoLDUConfig, n_found: int) -> None:
    parent, _, attr = name.rpartition(".")
    why = _bypass_reason(root.get_submodule(parent), attr)
    if why is None:
        return
    tm = config.target_modules
    if isinstance(tm, str):
        how = (f"target_modules={tm!r} matches it" + (f" together with {n_found - 1} other module(s)" if n_found > 1 else "")
               + f"; change the regex so that it does not match '{name}'")
    else:
        entry = next(t for t in tm if name == t or name.endswith("." + t))
        how = f"remove it from target_modules (the entry {entry!r} selects it) or list the wanted layers by full name"
    raise AdapterError(f"layer '{name}' cannot be adapted: {why}. Exclude it: {how}")


def _unmatched(root: nn.Module, entries: Sequence[str]) -> List[str]:
    """'entry ... matches no module[; did you mean ...?]' for each entry of a name list matching nothing."""
    names = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    leaves = sorted({n.rpartition(".")[2] for n in names})
    out = []
    for entry in entries:
        if any(n == entry or n.endswith("." + entry) for n in names):
            continue
        close = difflib.get_close_matches(entry.rpartition(".")[2], leaves, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        out.append(f"entry {entry!r} matches no module of {type(root).__name__}{hint}")
    return out


def _regex_hint(root: nn.Module, pattern: str) -> str:
    """Why a regex target_modules may match nothing: it must match a whole module name (as PEFT's)."""
    rx = re.compile(pattern)
    partial = [n for n, _ in root.named_modules() if n and rx.search(n)]
    text = "a str target_modules is a regular expression that must match a whole module name (re.fullmatch)"
    if partial:
        text += (f"; it matches inside {len(partial)} names, e.g. {partial[0]!r}: write '.*' around it "
                 f"(e.g. {'.*' + pattern + '.*'!r}) or give a list of names")
    return text


def _warn_unmatched(root: nn.Module, entries: Sequence[str], what: str) -> None:
    """One LolduWarning per entry of a name list that matches no module (a typo is otherwise silent)."""
    for text in _unmatched(root, entries):
        warnings.warn(f"loldu: {what} {text}", LolduWarning, stacklevel=4)


def _warn_unsaved_heads(root: nn.Module, config: LoLDUConfig, found) -> None:
    """With 'all-linear', a task head left out of the adapter that nothing trains gets a LolduWarning."""
    for name, module in root.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in HEADS and kind_of(module) in LINEAR_KINDS and not config.matches_saved(name):
            warnings.warn(f"loldu: target_modules='all-linear' leaves the task head '{name}' out, and nothing trains "
                          "it: pass task_type='SEQ_CLS' (or 'TOKEN_CLS', 'QUESTION_ANS'), or modules_to_save="
                          f"['{leaf}'], to train it and save it with the adapter", LolduWarning, stacklevel=5)


def find_saved(root: nn.Module, config: LoLDUConfig, targets: Targets) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every module config.saved_modules selects (modules_to_save and the task's heads).

    An explicit modules_to_save entry that matches nothing gets a LolduWarning; the heads a task_type
    implies are optional; a saved module whose parameters are tied to another module's gets a
    LolduWarning (its trained copy is no longer tied). Raises AdapterError when a saved module is,
    contains, or lies inside an adapted layer, is already a LoLDU module, is registered under two
    names (the copy would run under one of them only), has no forward of its own (a container such as
    nn.ModuleList, which its parent indexes), or keeps non-tensor state (get_extra_state).
    """
    if not config.saved_modules:
        return []
    all_names: Dict[int, List[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if name:
            all_names.setdefault(id(module), []).append(name)
    found: List[Tuple[str, nn.Module]] = []
    seen = set()
    for name, module in root.named_modules(remove_duplicate=False):
        if not name or not config.matches_saved(name) or any(name.startswith(f + ".") for f, _ in found):
            continue
        names = all_names[id(module)]
        if len(names) > 1:
            raise AdapterError(f"modules_to_save: module '{name}' is also registered as "
                               f"{', '.join(repr(n) for n in names if n != name)} (one module object under two names): "
                               "its trained copy would replace it under one name only, and calls through the other "
                               "would run the untrained original. Give each name its own module, or save neither")
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, (LoLDULayer, SavedModule)):
            raise AdapterError(f"modules_to_save: module '{name}' is already a LoLDU module")
        if not runs(module):
            raise AdapterError(f"modules_to_save: module '{name}' is a {type(module).__name__}, a container without a "
                               "forward of its own (its parent indexes it): name the modules inside it instead "
                               f"(e.g. '{name}.0')")
        odd = [k for k, v in module.state_dict().items() if not isinstance(v, torch.Tensor)]
        if odd:
            raise AdapterError(f"modules_to_save: module '{name}' keeps non-tensor state ({odd[0]!r}, from "
                               "get_extra_state), which an adapter file cannot hold")
        found.append((name, module))
    if config.modules_to_save:
        _warn_unmatched(root, config.modules_to_save, "modules_to_save")
    for s, _ in found:
        for t, _, _ in targets:
            if t == s or t.startswith(s + ".") or s.startswith(t + "."):
                raise AdapterError(f"modules_to_save: module '{s}' overlaps the adapted layer '{t}' (a module is either "
                                   "adapted or trained fully and saved, not both); narrow target_modules or modules_to_save")
    _warn_tied(root, found)
    return found


def _warn_tied(root: nn.Module, found: List[Tuple[str, nn.Module]]) -> None:
    """A LolduWarning for each saved module sharing a parameter with a module outside it (tied weights)."""
    for name, module in found:
        own = {id(p) for p in module.parameters()}
        others = [pn for pn, p in root.named_parameters(remove_duplicate=False)
                  if id(p) in own and not (pn.startswith(name + "."))]
        if others:
            warnings.warn(f"loldu: modules_to_save: module '{name}' shares its parameters with {others[0]!r} (tied "
                          "weights); its trained copy is not tied, so that module keeps the original values",
                          LolduWarning, stacklevel=5)
