"""How a model is walked and wrapped: inject, named adapters, merge/unload, disabled, mixed batches.

Every function takes a model (a DDP or torch.compile wrapper is looked through) and edits it in
place. Editing is transactional: all checks and all factorizations happen before the first module
is swapped, so a failure leaves the model exactly as it was.
"""
import contextlib
import difflib
import functools
import re
import sys
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import ALL_LINEAR, TASK_HEADS, LoLDUConfig
from .errors import AdapterError, FactorizationError, LolduWarning
from .heads import SavedModule
from .layer import KINDS, LoLDULayer, check_supported, kind_of, weight_matrix, weight_refusal
from .ldu import LDUResult, ldu, ldu_from_pivots
from .progress import Progress
from .state import AdapterState, adapted_layers, unwrap

_PROGRESS_MIN_LAYERS = 32  # show a progress bar from this many layers on
_STACK_BYTES = 256 << 20  # most bytes of weights stacked into one batched factorization call
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_SAVED_FLAGS = "_loldu_requires_grad"
_CALL_CHECK = "_loldu_call_check"
# The call check (_CallCheck) refuses a layer once its parent has run in this many forwards of the
# model without calling it (a parent may call a layer only in some forwards: a mixture of experts).
CALL_CHECK_FORWARDS = 8


# (name, module, kind) of the modules an adapter goes onto; what inject_with/add_with give `check`.
Targets = List[Tuple[str, nn.Module, str]]


def _state(model) -> AdapterState:
    """The model's adapters; AdapterError when it has no LoLDU layers."""
    return AdapterState.of(model).require_layers()


def _check_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not _NAME_RE.fullmatch(adapter_name):
        raise AdapterError(f"adapter name must be an identifier-like str (letters, digits, _ or -), got {adapter_name!r}")


# torch.nn modules that read a child Linear's weight instead of calling the child, so a LoLDU layer
# there would be silently ignored: (parent class, child attribute, why, refuse even if a subclass
# overrides forward). A subclass with its own forward is otherwise left to the run-time check
# (_CallCheck), which sees a bypass in every forward but not one that depends on the mode (an
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


def find_targets(model: nn.Module, config: LoLDUConfig) -> List[Tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module `config` targets, outside existing LoLDU layers and saved modules.

    target_modules="all-linear" selects every nn.Linear and transformers Conv1D but the output head
    (`get_output_embeddings()` of a transformers model), the saved modules (modules_to_save) and
    linears their parent never calls (nn.MultiheadAttention.out_proj, ...), which are skipped.
    A list entry that matches no module gets a LolduWarning (with the closest module names).
    Raises AdapterError for a module its parent does not call (e.g. nn.MultiheadAttention.out_proj).
    """
    root = unwrap(model)
    all_linear = config.target_modules == ALL_LINEAR
    head = _output_head(root) if all_linear else None
    found, inside = [], []
    for name, module in root.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (LoLDULayer, SavedModule)) or (all_linear and config.matches_saved(name)):
            inside.append(name)  # (a named target inside a saved module is refused by find_saved)
            continue
        if all_linear:
            if kind_of(module) in ("linear", "conv1d") and module is not head and name.rpartition(".")[2] not in HEADS \
                    and _bypass_reason(root.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) is None:
                found.append((name, module, check_supported(name, module)))
        elif config.matches(name):
            found.append((name, module, check_supported(name, module)))
    _check_registered_once(root, config)
    if not found:
        hints = _unmatched(root, config.target_modules) if isinstance(config.target_modules, list) else []
        raise AdapterError(f"target_modules={config.target_modules!r} matches no module of {type(root).__name__}"
                           + (f" ({'; '.join(hints)})" if hints else ""))
    if isinstance(config.target_modules, list):
        _warn_unmatched(root, config.target_modules, "target_modules")
    if all_linear:
        _warn_unsaved_heads(root, config, found)
    for name, _, _ in found:
        _check_not_bypassed(root, name, config, len(found))
    return found


def _output_head(root: nn.Module) -> Optional[nn.Module]:
    """A transformers model's output layer (the LM head), which target_modules='all-linear' leaves out."""
    get = getattr(root, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    return head if isinstance(head, nn.Module) else None


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


def _warn_unmatched(root: nn.Module, entries: Sequence[str], what: str) -> None:
    """One LolduWarning per entry of a name list that matches no module (a typo is otherwise silent)."""
    for text in _unmatched(root, entries):
        warnings.warn(f"loldu: {what} {text}", LolduWarning, stacklevel=4)


# Names of task heads: target_modules='all-linear' never adapts them (a fresh head has nothing to factorize).
HEADS = sorted({n for names in TASK_HEADS.values() for n in names})


def _warn_unsaved_heads(root: nn.Module, config: LoLDUConfig, found) -> None:
    """With 'all-linear', a task head left out of the adapter that nothing trains gets a LolduWarning."""
    for name, module in root.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in HEADS and kind_of(module) in ("linear", "conv1d") and not config.matches_saved(name):
            warnings.warn(f"loldu: target_modules='all-linear' leaves the task head '{name}' out, and nothing trains "
                          "it: pass task_type='SEQ_CLS' (or 'TOKEN_CLS', 'QUESTION_ANS'), or modules_to_save="
                          f"['{leaf}'], to train it and save it with the adapter", LolduWarning, stacklevel=5)


def find_saved(model: nn.Module, config: LoLDUConfig, targets: Targets) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every module config.saved_modules selects (modules_to_save and the task's heads).

    An explicit modules_to_save entry that matches nothing gets a LolduWarning; the heads a task_type
    implies are optional; a saved module whose parameters are tied to another module's gets a
    LolduWarning (its trained copy is no longer tied). Raises AdapterError when a saved module is,
    contains, or lies inside an adapted layer, is already a LoLDU module, is registered under two
    names (the copy would run under one of them only), has no forward of its own (a container such as
    nn.ModuleList, which its parent indexes), or keeps non-tensor state (get_extra_state).
    """
    root = unwrap(model)
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
        if not _runs(module):
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


def _check_registered_once(root: nn.Module, config: LoLDUConfig) -> None:
    """A target registered in two places (`model.dec = model.enc`) would be swapped for its LoLDU layer
    in one of them only, so calls through the other would silently run without the adapter: refused
    when any of its names is targeted. (A shared parent is fine: the layer replaces the child in the
    one parent object all its names reach.)"""
    names: Dict[int, List[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if name and not isinstance(module, LoLDULayer):
            names.setdefault(id(module), []).append(name)
    for all_names in names.values():
        if len(all_names) < 2 or not any(config.matches(n) for n in all_names):
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

    with Progress(len(targets), "loldu: factorizing", "layers", enabled=show) as bar:
        for (shape, dtype, _), items in groups.items():
            per = max(1, _STACK_BYTES // max(1, shape[0] * shape[1] * torch.finfo(dtype).bits // 8))
            for i in range(0, len(items), per):
                chunk = items[i : i + per]
                names = [n for n, _ in chunk]
                Ws = torch.stack([W for _, W in chunk])
                _check_finite(Ws, names)
                try:
                    res = run(Ws, names)
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


def _check_finite(Ws: torch.Tensor, names: Sequence[str]) -> None:
    """Every weight of the stack (n, d, k) must be finite: the factorization reads only some of its
    entries, and a NaN elsewhere would make every output NaN. One pass over the stack."""
    ok = torch.isfinite(Ws).flatten(1).all(1).tolist()
    bad = [n for n, good in zip(names, ok) if not good]
    if bad:
        more = f" (so do {', '.join(repr(n) for n in bad[1:])})" if len(bad) > 1 else ""
        raise AdapterError(f"layer '{bad[0]}' (weight {tuple(Ws.shape[1:])}): the base weight holds NaN or Inf{more}; "
                           "the adapted layer's outputs would be NaN")


def build_layers(targets, factors: Dict[str, LDUResult], config: LoLDUConfig) -> Dict[str, LoLDULayer]:
    """Wrappers around the target modules (the model is not touched yet)."""
    layers = {}
    for name, module, kind in targets:
        layers[name] = KINDS[kind].wrapper(module, factors[name], config.torch_factor_dtype(module.weight.dtype), name,
                                           storage=config.factor_storage)
    return layers


def _runs(module: nn.Module) -> bool:
    """Whether the module has a forward of its own (nn.ModuleList / nn.ModuleDict are never called)."""
    return type(module).forward is not nn.Module.forward


class _CallCheck:
    """Checks, once per layer, that every adapted layer is called when its parent module runs.

    A parent that reads a child's weight instead of calling it (as nn.MultiheadAttention does with
    out_proj) silently ignores the adapter. For each layer, its parent is the nearest ancestor with a
    forward of its own (containers such as nn.ModuleList are skipped). Hooks on the layers and their
    ancestors record, per thread, the outermost forward of the model (or of a submodule called on
    its own): which parents ran and which layers were called. When it ends, each pending layer whose
    parent it covers is judged: a layer called somewhere in that forward (also by the grandparent
    after the parent returned) is settled; a layer whose parent did not run is dropped unchecked.
    A parent may call a layer in some forwards only (a top-1 mixture of experts whose parent calls
    experts[k], an early exit), so a layer its parent ran without is only counted: the forward in
    which its parent has run CALL_CHECK_FORWARDS times without ever calling it raises AdapterError
    (and so does every later one where this happens, until the layer is called). Settled hooks remove
    themselves, so once every layer is settled no hook is left (no steady-state cost). A forward
    that raises is not checked. A layer called outside any forward of the model (e.g. directly by
    the user) cannot be checked and is dropped. loldu.inject / loldu.load_adapter(check_calls=False)
    skip the check.

    Under torch.compile / torch.export the hooks do nothing (dynamo traces them as no-ops, so
    fullgraph=True holds); the check then runs at the first eager forward, if any. A parent whose
    forward itself is compiled (its hooks run eagerly, its calls do not) is not checked.
    """

    def __init__(self, root: nn.Module, names: Sequence[str]):
        self.parent: Dict[str, str] = {}  # layer name -> name of the parent that must call it
        for name in names:
            p = name
            while p:
                p = p.rpartition(".")[0]
                if _runs(root.get_submodule(p)):
                    self.parent[name] = p
                    break
        self.misses: Dict[str, int] = {}  # layer name -> forwards in which its parent ran without calling it
        self.frames: Dict[int, dict] = {}  # thread id -> the outermost forward in progress
        self.handles: Dict[str, list] = {}  # module name -> hook handles
        self.classes = {p: type(root.get_submodule(p)).__name__ for p in self.parent.values()}
        for name in self.parent:
            self.handles[name] = [root.get_submodule(name).register_forward_pre_hook(functools.partial(self._called, name))]
        for a in self._ancestors():
            m = root.get_submodule(a)
            self.handles[a] = [m.register_forward_pre_hook(functools.partial(self._enter, a)),
                               m.register_forward_hook(functools.partial(self._exit, a), always_call=True)]

    def _ancestors(self) -> set:
        out = set()
        for name in self.parent:
            p = name
            while p:
                p = p.rpartition(".")[0]
                out.add(p)
        return out

    def remove(self) -> None:
        for hs in self.handles.values():
            for h in hs:
                h.remove()
        self.handles.clear()
        self.parent.clear()
        self.misses.clear()

    def _called(self, name, module, args):
        if torch.compiler.is_compiling():
            return
        frame = self.frames.get(threading.get_ident())
        if frame is not None:
            frame["called"].add(name)
        elif name in self.parent:  # used outside the model's forward: cannot be checked
            del self.parent[name]
            self._prune()

    def _enter(self, name, module, args):
        if torch.compiler.is_compiling():
            return
        frame = self.frames.setdefault(threading.get_ident(), {"depth": 0, "top": name, "ran": set(), "called": set(),
                                                               "compiled": set(), "failed": False})
        frame["depth"] += 1
        frame["ran"].add(name)
        if getattr(module.forward, "_torchdynamo_orig_callable", None) is not None:
            frame["compiled"].add(name)  # a torch.compile'd forward: its calls are not seen

    def _exit(self, name, module, args, output):
        if torch.compiler.is_compiling():
            return
        tid = threading.get_ident()
        frame = self.frames.get(tid)
        if frame is None:
            return
        if sys.exc_info()[0] is not None:  # always_call: the forward raised (or runs inside an except block)
            frame["failed"] = True
        frame["depth"] -= 1
        if frame["depth"] > 0:
            return
        del self.frames[tid]
        if not frame["failed"]:
            self._settle(frame)

    def _settle(self, frame) -> None:
        top, ran, called = frame["top"], frame["ran"], frame["called"]
        missed = []
        for name, p in list(self.parent.items()):
            if top and p != top and not p.startswith(top + "."):
                continue  # not covered by this forward
            if p in ran and p not in frame["compiled"] and name not in called:
                self.misses[name] = self.misses.get(name, 0) + 1
                if self.misses[name] >= CALL_CHECK_FORWARDS:
                    missed.append((name, p))
            else:  # called (settled), or its parent did not run or is compiled (cannot be checked)
                del self.parent[name]
                self.misses.pop(name, None)
        self._prune()
        if missed:
            name, p = missed[0]
            more = f" ({len(missed)} such layers: {', '.join(repr(n) for n, _ in missed)})" if len(missed) > 1 else ""
            raise AdapterError(
                f"LoLDU layer '{name}' was never called in the {self.misses[name]} forwards where its parent '{p}' "
                f"({self.classes[p]}) ran{more}: the parent does not call it (it reads the layer's weight, or skips the "
                "layer), so the adapter is silently ignored (no gradient to z) while merge would still change the "
                "outputs. Exclude it from target_modules (loldu.unload restores the model); if the parent does call it "
                "in rare forwards only, inject or load with check_calls=False to skip this check")

    def _prune(self) -> None:
        """Removes the hooks no pending layer needs."""
        keep = set(self.parent) | self._ancestors()
        for name in [n for n in self.handles if n not in keep]:
            for h in self.handles.pop(name):
                h.remove()


def commit(model: nn.Module, layers: Dict[str, LoLDULayer], adapter_name: str, check_calls: bool = True,
           saved: Optional[Dict[str, SavedModule]] = None, trainable: bool = True) -> None:
    """Freezes every parameter, swaps the wrappers (LoLDU layers and saved modules) in and activates
    `adapter_name` (trainable unless `trainable` is False).

    With `check_calls`, also arms the one-time check that every layer is called by its parent (_CallCheck).
    """
    root = unwrap(model)
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
        object.__setattr__(root, _CALL_CHECK, _CallCheck(root, list(layers)))


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
    with _named(where):
        targets = find_targets(model, config)
        found_saved = find_saved(model, config, targets)
    if check is not None:
        check(targets)
    if check_saved is not None:
        check_saved(found_saved)
    with _named(where):
        factors = factorize(targets, config, pivots=pivots, progress=progress)
    layers = build_layers(targets, factors, config)
    saved = {n: SavedModule(m, n) for n, m in found_saved}
    prefix = f"{where}: " if where else ""
    AdapterState(list(layers.items()), saved=list(saved.items())).add(adapter_name, config, values, saved_values,
                                                                       where=prefix)
    commit(model, layers, adapter_name, check_calls, saved, trainable)
    return model


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
    state.add(adapter_name, config, values, saved_values, where=f"{where}: " if where else "")
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
    if name is not None and not bool(torch.isfinite(layer.coefficients(name)).all()):
        return f"adapter {name!r} has NaN/Inf coefficients c = sigma z - sigma0 D (z or sigma diverged)"
    return None


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
        why = _merge_refusal(layer, name)
        if why is not None:
            raise AdapterError(f"loldu.merge: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}): {why}")
    done: List[LoLDULayer] = []
    for n, layer in layers:
        try:
            layer.merge(name)
        except Exception as e:
            for merged in reversed(done):
                merged.unmerge()
            raise AdapterError(f"loldu.merge: layer '{n}' (weight {tuple(layer.base_layer.weight.shape)}): cannot "
                               f"write the merged weight ({type(e).__name__}: {' '.join(str(e).split())}); the "
                               f"{len(done)} layer(s) merged before it were unmerged again") from e
        done.append(layer)
    return model


def _require_unmergeable(layers: Sequence[Tuple[str, LoLDULayer]], what: str) -> None:
    """Every merged layer's weight must be writable now (checked before any is unmerged)."""
    for n, layer in layers:
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
        layer.unmerge()
    return model


def _strip(model: nn.Module, keep_heads: bool = False) -> nn.Module:
    """Puts the base modules back; a saved module becomes its original, or with `keep_heads` the
    active adapter's trained copy (merge_and_unload)."""
    root = unwrap(model)
    state = AdapterState.of(root)
    for name, layer in state.layers:
        parent, _, attr = name.rpartition(".")
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
    loldu.adapter_names(model), -1 = base model. Every adapted layer must see the batch as dim 0.
    """
    state = _state(model)
    names, layers = state.names, state.layers
    if state.saved:
        raise AdapterError(f"loldu.adapter_ids: the model trains saved modules ('{state.saved[0][0]}', "
                           "modules_to_save) per adapter, which cannot be mixed within one batch")
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
