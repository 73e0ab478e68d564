"""The run-time call check: every adapted layer must be called when its parent module runs (CallCheck).

The static refusals (loldu.targets) know the torch.nn modules that read a child's weight instead
of calling it; this check catches any other parent that does, at the model's first forwards.
"""
import functools
import sys
import threading
from typing import Dict, Sequence

import torch
import torch.nn as nn

from .errors import AdapterError

# The call check (CallCheck) refuses a layer once its parent has run in this many forwards of the
# model without calling it (a parent may call a layer only in some forwards: a mixture of experts).
CALL_CHECK_FORWARDS = 8


def runs(module: nn.Module) -> bool:
    """Whether the module has a forward of its own (nn.ModuleList / nn.ModuleDict are never called)."""
    return type(module).forward is not nn.Module.forward


class CallCheck:
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

    A layer is settled by the first forward that calls it, whatever the mode (train or eval): a
    parent that calls it in one mode and bypasses it in the other (an eval-only fast path) is not
    caught once settled. Keeping every hook until both modes were seen would cost every forward of
    a model that only trains; instead loldu.targets refuses the torch.nn parents known to do so
    (nn.TransformerEncoderLayer's inference fast path) for every subclass.

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
                if runs(root.get_submodule(p)):
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

