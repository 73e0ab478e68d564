"""The precision policy of the adapter branch (docs/method.md §6): one decision per forward, which
every factor store (loldu.stores) follows.

- fp32: the branch runs in the working dtype (fp32; fp64 for fp64 factors) with autocast off, and
  is added, cast once, to the base layer's own output whenever the layer computes in fp16 (an fp16
  weight, or autocast to fp16): fp16's range (65504) is too small for x U^T even with ordinary
  factors, and Inf * 0 is NaN even at c == 0. bf16 has fp32's range: the branch runs natively
  (Linear-like kinds: the fused op). The compute dtype is autocast's where the branch's products
  run under the caller's autocast, else the weight's.
- natively, the factors are used in the layer's compute dtype: the weight's, or as stored under
  autocast, which casts inside the ops.
"""
from typing import Tuple

import torch

from .ops import autocast_enabled, working_dtype


class Precision:
    """The decision for one forward of a layer whose base weight has `weight_dtype`, on input x."""

    def __init__(self, weight_dtype: torch.dtype, x: torch.Tensor):
        self.device_type = x.device.type
        self.autocast = autocast_enabled(self.device_type)
        self.weight_dtype = weight_dtype
        compute = torch.get_autocast_dtype(self.device_type) if self.autocast else weight_dtype
        self.compute = compute  # the dtype the layer's output comes in
        self.fp32 = compute == torch.float16
        # The same decision where the branch's products run with autocast off whatever the caller's
        # autocast (the cur store's lookup): there the weight's dtype is the compute dtype.
        self.fp32_weight = weight_dtype == torch.float16

    def factors(self, *factors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The factors in the dtype the native branch computes in (autocast casts inside the op instead)."""
        if self.autocast:
            return factors
        return tuple(t.to(self.weight_dtype) for t in factors)

    def autocast_off(self):
        """The context the fp32 branch (and every product cast by hand) runs in."""
        return torch.autocast(self.device_type, enabled=False)


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in its working dtype (fp32; fp64 for fp64), as the fp32 branch uses the stored factors."""
    return t.to(working_dtype(t.dtype))
