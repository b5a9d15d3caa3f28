"""ReLU6 kinks in Refiner's reference, for float32 gradient comparisons.

Refiner applies ReLU6 to the outputs u (B, C, N, N) of BN1 and BN2. The derivative of ReLU6 jumps
from 1 to 0 at u = 0 and u = 6, so an element whose exact u lies within float32 rounding of a kink
may fall on either side in any float32 implementation: PyTorch computes u as
(x - mean) * invstd * gamma + beta, the C++ kernel as s x + t with s, t folded per channel. Both
are correct float32 results, yet one element's gradient passes the mask in one and not in the
other, and through the BatchNorm mean terms it moves every gradient of q and k (by 2% in the
pinned case of test_properties.py). Such draws are compared with the float64 reference taken on
either side of each such kink: the float32 result must match one of them.

`relu6_hook` patches torch.nn.functional.relu6 (which `refined_attention_ref` calls, BN1's then
BN2's) to record its inputs or to flip its gradient at chosen elements.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F

_RELU6 = F.relu6


class _FlippedRelu6(torch.autograd.Function):
    """ReLU6 whose derivative (1 inside (0, 6), else 0) is inverted at the elements `flip` (a
    flat index tensor): the one-sided derivative of the other side of the kink there."""

    @staticmethod
    def forward(ctx, x, flip):
        inside = ((x > 0) & (x < 6)).flatten()
        inside[flip] = ~inside[flip]
        ctx.save_for_backward(inside.view_as(x))
        return _RELU6(x)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


@contextmanager
def relu6_hook(record: list | None = None, flips: dict | None = None):
    """Within the block, the i-th call of F.relu6 appends its input to `record` (if given) and,
    for i in `flips`, inverts its derivative at the flat indices flips[i]."""
    counter = itertools.count()

    def relu6(x, inplace=False):
        i = next(counter)
        if record is not None:
            record.append(x.detach().clone())
        if flips and i in flips:
            return _FlippedRelu6.apply(x, flips[i])
        return _RELU6(x, inplace)

    with mock.patch.object(F, "relu6", relu6):
        yield


def kink_candidates(u64: list, u32: list, margin: float = 4.0) -> list:
    """(call, flat index) of the ReLU6 inputs whose float64 value lies within `margin` times the
    channel's largest float32 rounding error (|u32 - u64| over the channel) of 0 or 6.

    u64, u32: the inputs recorded from the float64 and the float32 reference, (B, C, N, N) each.
    """
    found = []
    for call, (a, b) in enumerate(zip(u64, u32)):
        noise = (b.double() - a).abs().amax(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        dist = torch.minimum(a.abs(), (a - 6).abs())
        idx = (dist <= margin * noise).flatten().nonzero().flatten()
        found += [(call, int(i)) for i in idx]
    return found


def flip_patterns(candidates: list) -> list:
    """Every non-empty subset of the candidates, as `flips` arguments of relu6_hook."""
    patterns = []
    for r in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, r):
            flips = {}
            for call, i in subset:
                flips.setdefault(call, []).append(i)
            patterns.append({c: torch.tensor(ix) for c, ix in flips.items()})
    return patterns
