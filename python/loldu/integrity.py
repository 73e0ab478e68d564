"""Checks that keep an adapter's numbers meaningful: the base weight its frozen factors came from, and
the bound on its coefficients c (the adapter spec's c_check, loldu/adapter_spec.json).

Fingerprints: the frozen factors are a function of what the factorization reads of W0, W0[:, :r]
and W0[pivots, :] (docs/method.md §2). An adapter file records a sha256 of exactly that, and so
does every layer when its factors are installed (at inject, load_state_dict, a change of factor
storage). A base weight edited in place afterwards (`.data`, `copy_`, a new Parameter) leaves the
factors stale: the forward still runs, but a file saved now would pair the new weight's
fingerprint with factors of the old one, and reload as another model. `stale_refusal` says so.

Coefficient bound: every c_i must be finite and |c_i| <= C_ABS_MAX. Without W0 (save, load) D is
unknown, so the term without D is checked in float64 (`c_terms_refusal`); merge checks c itself.
"""
import hashlib
from typing import Dict, List, Optional, Tuple

import torch

from .errors import AdapterError
from .spec import C_ABS_MAX

# The attribute of a LoLDU layer that holds the fingerprint of the weight its factors were derived from.
_SOURCE = "_loldu_factor_source"


def fingerprint_reads(shape, cols: torch.Tensor, rows: torch.Tensor) -> bytes:
    """sha256 of a (d, k) weight's shape, dtype, W[:, :r] (cols) and W[pivots, :] (rows), 32 bytes."""
    h = hashlib.sha256()
    h.update(f"loldu-fp1|{tuple(shape)}|{str(cols.dtype)}|".encode())
    for part in (cols, rows):
        h.update(part.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


def fingerprint(W: torch.Tensor, pivots: torch.Tensor) -> bytes:
    """sha256 of W's (d, k) shape, dtype, W[:, :r] and W[pivots, :] (r = len(pivots)), 32 bytes.

    Reads only what the factorization reads, so it costs O((d + k) r), and a base that would give
    different frozen factors gives a different fingerprint.
    """
    r = pivots.shape[0]
    return fingerprint_reads(W.shape, W[:, :r], W.index_select(0, pivots.to(W.device)))


def _reads_now(layer) -> Tuple[tuple, torch.Tensor, torch.Tensor]:
    """(shape, W0[:, :r], W0[pivots, :]) of the layer's base weight; while merged, as before the merge."""
    W = layer.base_matrix()
    merged = getattr(layer, "_merged_reads", None)
    if merged is not None:
        return tuple(W.shape), merged[0], merged[1]
    piv = layer.loldu_pivots
    return tuple(W.shape), W[:, :piv.shape[0]], W.index_select(0, piv.to(W.device))


def _source_now(layer) -> Optional[bytes]:
    """The fingerprint of what the factorization reads of the layer's base matrix (as its store serves
    it: for a store that keeps its own form of W0 in the weight, that form) now; None on meta."""
    shape, cols, rows = _reads_now(layer)
    return None if cols.is_meta or rows.is_meta else fingerprint_reads(shape, cols, rows)


@torch.no_grad()
def record_factor_source(layer) -> None:
    """Remembers the fingerprint of what the layer's frozen factors were just derived from."""
    setattr(layer, _SOURCE, _source_now(layer))


@torch.no_grad()
def is_fresh(layer) -> bool:
    """Whether the layer's base weight still reads as it did when its frozen factors were derived."""
    source = getattr(layer, _SOURCE, None)
    return source is None or _source_now(layer) in (None, source)


def stale_refusal(layer) -> Optional[str]:
    """Why the layer's frozen factors no longer fit its base weight, or None."""
    if is_fresh(layer):
        return None
    return ("its base weight changed after its frozen factors were derived (an in-place edit such as .data or "
            "copy_, or a replaced Parameter): the factors are stale, and an adapter saved or merged now would not "
            "match the model. Load new base weights with model.load_state_dict (which re-derives the factors), or "
            "re-inject (loldu.unload, then loldu.inject or loldu.load_adapter)")


def c_terms_refusal(z: torch.Tensor, sigma, sigma0: float, parametrization: str) -> Optional[str]:
    """Why adapter values z (r,), sigma () break the c bound, or None: in float64, each term of c
    that does not involve D (paper: sigma z_i; relative: (sigma / sigma0) z_i) must be finite and
    at most C_ABS_MAX in magnitude. sigma0 is the config's initial scale rounded to fp32."""
    z64 = z.detach().to("cpu", torch.float64).reshape(-1)
    s = (sigma.detach().to("cpu", torch.float64).reshape(()) if isinstance(sigma, torch.Tensor)
         else torch.tensor(float(sigma), dtype=torch.float64))
    if parametrization == "relative":
        s = s / float(torch.tensor(sigma0, dtype=torch.float32))
        term = "(sigma / sigma0) * z"
    else:
        term = "sigma * z"
    t = s * z64
    bad = (~torch.isfinite(t)) | (t.abs() > C_ABS_MAX)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    return (f"its coefficient c[{i}] is out of bounds ({term} = {float(t[i]):.4g} at index {i}, sigma = "
            f"{float(s):.4g}): every |c_i| must be finite and at most {C_ABS_MAX:g} (training diverged, or the "
            "values were set by hand)")


def c_refusal(c: torch.Tensor) -> Optional[str]:
    """Why coefficients c (as the layer computes them, in its working dtype) break the c bound, or None."""
    c = c.detach()
    bad = (~torch.isfinite(c)) | (c.abs() > C_ABS_MAX)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    return f"its coefficient c[{i}] = {float(c[i]):.4g} is not finite or exceeds |c| <= {C_ABS_MAX:g}"


def check_values(tensors: Dict[str, torch.Tensor], saved_keys: set, layers: List[dict], config, wpath) -> None:
    """An adapter file's values (loldu.adapter_io.read_adapter; `config` its LoLDUConfig, `wpath` the file):
    finite z, sigma and saved floating tensors; c within the spec's bound; r distinct in-range
    pivot rows per layer. z and pivots are the layers' vectors concatenated (R,), each layer entry
    holding its rank. Checked on whole tensors at once (a file may hold 100k layers); the first bad
    layer is then named, with c_terms_refusal's message for its c."""
    z, sigma = tensors["z"], tensors["sigma"]
    if not (torch.isfinite(z).all() and torch.isfinite(sigma).all()):
        raise AdapterError(f"{wpath}: z or sigma holds NaN/Inf")
    rank_list = [e["rank"] for e in layers]
    ranks = torch.tensor(rank_list, dtype=torch.int64)
    starts = torch.cumsum(ranks, 0) - ranks
    layer_of = torch.repeat_interleave(torch.arange(len(layers)), ranks)
    scales = _initial_scales(layers, config)
    first = _first_true(_c_terms_out_of_bounds(z, sigma, layer_of, scales, config.parametrization))
    if first is not None:  # the first bad element lies in the first bad layer (layers are in order)
        i = int(layer_of[first])
        a, b = int(starts[i]), int(starts[i] + ranks[i])
        why = c_terms_refusal(z[a:b], sigma[i], float(scales[i]), config.parametrization)
        raise AdapterError(f"{wpath}: layer '{layers[i]['name']}': {why}")
    floating = [key for key in sorted(saved_keys) if tensors[key].is_floating_point()]
    if not _all_finite([tensors[key] for key in floating]):
        bad = next(key for key in floating if not bool(torch.isfinite(tensors[key]).all()))
        raise AdapterError(f"{wpath}: saved tensor '{bad}' holds NaN/Inf")
    p = tensors["pivots"]
    rows = torch.tensor([e["shape"][0] for e in layers], dtype=torch.int64)
    bad = torch.zeros(len(layers), dtype=torch.bool)
    for r in sorted(set(rank_list)):  # one (n, r) gather per distinct rank
        idx = (ranks == r).nonzero().flatten()
        ordered = p[starts[idx, None] + torch.arange(r)].sort(dim=1).values
        bad[idx] = (ordered[:, 0] < 0) | (ordered[:, -1] >= rows[idx]) | (ordered.diff(dim=1) == 0).any(dim=1)
    first = _first_true(bad)
    if first is not None:
        d = layers[first]["shape"][0]
        raise AdapterError(f"{wpath}: layer '{layers[first]['name']}': pivots must be {layers[first]['rank']} "
                           f"distinct rows in [0, {d})")


def _initial_scales(layers: List[dict], config) -> torch.Tensor:
    """(L,) float64: each layer's initial scale sigma0 (fp32-rounded), one value unless it differs per layer."""
    if not config.per_layer or config.sigma0 is not None:
        return torch.full((len(layers),), config.initial_scale, dtype=torch.float64)
    return torch.tensor([config.scale_for(e["name"], e["rank"]) for e in layers], dtype=torch.float64)


def _c_terms_out_of_bounds(z: torch.Tensor, sigma: torch.Tensor, layer_of: torch.Tensor, scales: torch.Tensor,
                           parametrization: str) -> torch.Tensor:
    """(R,) bool: the entries of z (R,) whose term of c breaks the spec's bound, by c_terms_refusal's
    float64 rule, with sigma (L,) and the initial scales (L,) spread to the entries (`layer_of`)."""
    s = sigma.to(torch.float64)
    if parametrization == "relative":
        s = s / scales
    t = s[layer_of] * z.to(torch.float64)
    return (~torch.isfinite(t)) | (t.abs() > C_ABS_MAX)


def _all_finite(floating: List[torch.Tensor]) -> bool:
    """Whether every element of the floating-point tensors is finite: one check per dtype, not per tensor
    (a saved module may hold many small tensors)."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in floating:
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    return all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_dtype.values())


def _first_true(flags: torch.Tensor) -> Optional[int]:
    """The index of the first True in the 1-d bool tensor `flags`, or None."""
    hits = flags.nonzero()
    return int(hits[0, 0]) if hits.numel() else None
