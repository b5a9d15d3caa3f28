"""Attention dropout's keep-mask inside the Triton kernels: the Philox4x32-10 stream of
fastattnreg/ops/dropout.py, one uint32 word per entry of P (B, H, N, N).

  e = ((b * H + h) * N + i) * N + j, counter (lo32(e // 4), hi32(e // 4), lo32(offset),
  hi32(offset)), key (lo32(seed), hi32(seed)), word e % 4, keep iff word >= threshold.

Every kernel that needs the mask (forward P V; backward dV and dP) regenerates it from
(seed, offset) and the entry's index, so the mask is never stored. The threshold is computed by
the op layer (ops.dropout.dropout_threshold) and passed in, so every backend compares against
the same integer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Dropout(NamedTuple):
    """What the launchers pass to the kernels: rng int64 (2,) = (seed, offset) on the kernels'
    device (loaded inside the kernels, never read on the host), the uint32 drop threshold and
    the keep scale 1 / (1 - p)."""

    rng: torch.Tensor
    threshold: int
    scale: float


@triton.jit
def dropout_keep(seed, offset, z, rows, cols, N, threshold):
    """bool (len(rows), len(cols)) tile: True where P[b, h, rows, cols] of head z = b * H + h is
    kept. seed, offset: int64 scalars loaded from rng. Index arithmetic is int64: B*H*N*N can
    pass 2**31, and e // 4 can pass 2**32 (its high word goes into the counter)."""
    e = (z.to(tl.int64) * N + rows.to(tl.int64))[:, None] * N + cols.to(tl.int64)[None, :]
    counter = e >> 2
    # int64 -> uint32 keeps the low 32 bits (two's complement), for negative offsets too.
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = tl.zeros(c0.shape, tl.uint32)
    c2 = zero + offset.to(tl.uint32)
    c3 = zero + (offset >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    word = e & 3
    u = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    # uint32 -> int64 zero-extends, so thresholds up to 2**32 - 1 compare as unsigned.
    return u.to(tl.int64) >= threshold
