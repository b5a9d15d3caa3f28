"""StatsBatchNorm2d: nn.BatchNorm2d whose running statistics stay float32 in a 16-bit layer.

A running average kept in bfloat16 (8 significant bits) stops moving once the step
momentum * (batch - running) falls below half a unit in its last place, about 0.4% of its value:
a bfloat16 RefinerAttention's statistics would then freeze early in training. This BatchNorm keeps
running_mean and running_var in float32 when it is built with, or converted to (`.to`,
`.bfloat16()`, `.half()`), a 16-bit floating dtype; its weight and bias follow the module's
dtype as usual. A conversion to float32 or float64 applies as usual, and the float32 copy is
taken from the values before the conversion, so nothing is rounded. The refiner kernels read
and update float32 statistics for bfloat16 inputs directly (ops/refiner.py).

Parameter and buffer names are nn.BatchNorm2d's, so state dicts load both ways (a 16-bit
checkpoint's statistics are widened on load, ours are narrowed by a 16-bit module on load).
"""
from __future__ import annotations

import torch
from torch import nn

_NARROW = (torch.float16, torch.bfloat16)
_STATS = ("running_mean", "running_var")


class StatsBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._widen_stats({})

    def _widen_stats(self, before: dict) -> None:
        # Each 16-bit statistic becomes float32: from its value before a conversion when there
        # was one (exact), else from itself (a fresh buffer: zeros and ones, exact too).
        for name in _STATS:
            t = getattr(self, name)
            if t is not None and t.dtype in _NARROW:
                src = before.get(name, t)
                setattr(self, name, src.detach().to(device=t.device, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name) for name in _STATS if getattr(self, name) is not None}
        out = super()._apply(fn, recurse)
        self._widen_stats(before)
        return out
