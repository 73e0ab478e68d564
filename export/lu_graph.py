"""The full-rank serving graph: an adapted linear layer as two MatMuls against its triangular factors
with D + c between them, and no W0 (to_onnx(..., merge=False, lu_graph=True)).

At full rank, r = m = min(d, k), the factorization is exact, W0 = PL diag(D) U, so the adapted weight
is W(c) = PL diag(D + c) U (docs/method.md §1 at full rank; Shi et al., arXiv 2410.13618) and

    y = ((x U^T) * (D + c)) PL^T + b,

where the `W0 + ΔW` graph computes x W0^T + b + ((x U^T) * c) PL^T: three MatMuls and three (d, k)-size
matrices for two MatMuls and two. ONNX has no triangular product, so PL (d, m, unit
lower-trapezoidal in pivot order) and U (m, k, unit upper-trapezoidal) are stored dense, zeros
included (docs/storage.md on the packed LU, which a triangular kernel would read instead). At c = 0
the graph gives W0's outputs within the LU's rounding, not bit for bit.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from loldu.errors import ExportError
from loldu.kinds import KINDS


def lu_graph_refusal(name: str, layer: nn.Module) -> Optional[str]:
    """Why layer `name` cannot take the full-rank serving graph, or None."""
    if not KINDS[layer.kind].fused:
        return (f"layer '{name}' is a {KINDS[layer.kind].label}: the full-rank serving graph computes "
                "Linear-like layers (nn.Linear, transformers Conv1D) only")
    PL, U = layer.store.full_factors(layer)
    d, k = PL.shape[0], U.shape[1]
    if layer.rank != min(d, k):
        return (f"layer '{name}' (weight {d} x {k}) has rank {layer.rank}: the serving graph without W0 "
                f"needs full rank, min(d, k) = {min(d, k)} (rank='full' at inject)")
    return None


class LuGraph(nn.Module):
    """Stands in for a full-rank adapted Linear-like layer in the exporter's copy: y = ((x U^T) *
    (D + c)) PL^T + b with the c the export chose, a constant or the graph input slots[index]."""

    def __init__(self, name: str, layer: nn.Module, c: Optional[torch.Tensor] = None,
                 slots: Optional[List[torch.Tensor]] = None, index: int = 0):
        super().__init__()
        why = lu_graph_refusal(name, layer)
        if why is not None:
            raise ExportError(f"loldu.export: lu_graph=True: {why}")
        PL, U = layer.store.full_factors(layer)
        # Stored as the MatMuls read them, so the graph holds no Transpose of a (d, k)-size constant.
        self.register_buffer("Ut", U.detach().t().contiguous(), persistent=False)
        self.register_buffer("PLt", PL.detach().t().contiguous(), persistent=False)
        self.register_buffer("D", layer.loldu_D.detach().clone(), persistent=False)
        self.bias = layer.base_layer.bias
        self.slots, self.index = slots, index
        if c is not None:
            self.register_buffer("c", c, persistent=False)

    def forward(self, x):
        c = self.c if self.slots is None else self.slots[self.index]
        t = x.to(self.Ut.dtype) @ self.Ut
        y = (t * (self.D.float() + c.float()).to(t.dtype)) @ self.PLt
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias
