"""The frozen factors of every target: one batched LDU factorization per group of same-shape weights."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import LoLDUConfig
from .distributed import factorize_sharded, is_sharded, shard_layer
from .errors import AdapterError, FactorizationError
from .layer import KINDS, LoLDULayer, weight_matrix
from .ldu import LDUResult, ldu, ldu_from_pivots
from .progress import Progress

_PROGRESS_MIN_LAYERS = 32  # show a progress bar from this many layers on
_STACK_BYTES = 256 << 20  # most bytes of weights stacked into one batched factorization call


def factorize(targets: Sequence[Tuple[str, nn.Module, str]], config: LoLDUConfig,
              pivots: Optional[Dict[str, torch.Tensor]] = None, progress: Optional[bool] = None) -> Dict[str, LDUResult]:
    """Frozen factors of every target, batched over same-shape weights of the same rank (config.rank_for).

    With `pivots` (name -> (r,) int64), re-derives them from stored pivots (loldu.ldu_from_pivots)
    instead of choosing pivots. Raises AdapterError naming the layer that cannot be factorized.
    Weights sharded by FSDP2: loldu.distributed.factorize_sharded (collective; factored when built).
    """
    if any(is_sharded(getattr(m, "weight", None)) for _, m, _ in targets):
        return factorize_sharded(targets, config, pivots)
    groups: Dict[tuple, list] = {}
    for name, module, kind in targets:  # every layer's rank first: a bad one is refused before any work
        W = weight_matrix(module)
        r = config.rank_for(name, tuple(W.shape), kind)
        groups.setdefault((tuple(W.shape), r, W.dtype, W.device), []).append((name, W.detach()))
    show = progress if progress is not None else len(targets) >= _PROGRESS_MIN_LAYERS
    out: Dict[str, LDUResult] = {}

    def run(Ws, names, r):
        if pivots is None:
            return ldu(Ws, r, pivoting=config.pivoting)
        return ldu_from_pivots(Ws, torch.stack([pivots[n] for n in names]).to(Ws.device))

    with Progress(len(targets), "loldu: factorizing", "layers", enabled=show) as bar:
        for (shape, r, dtype, _), items in groups.items():
            per = max(1, _STACK_BYTES // max(1, shape[0] * shape[1] * torch.finfo(dtype).bits // 8))
            for i in range(0, len(items), per):
                chunk = items[i : i + per]
                names = [n for n, _ in chunk]
                Ws = torch.stack([W for _, W in chunk])
                _check_finite(Ws, names)
                try:
                    res = run(Ws, names, r)
                except FactorizationError:
                    res = None
                if res is None:  # find the culprit, one layer at a time
                    for n, W in chunk:
                        try:
                            run(W.unsqueeze(0), [n], r)
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
        layers[name] = shard_layer(KINDS[kind].wrapper(module, factors[name], config.torch_factor_dtype(
            module.weight.dtype), name, storage=config.factor_storage))
    return layers

