"""Attention dropout's random stream, shared by every backend: Philox4x32-10, counter based.

The kernels never store the (B, H, N, N) keep-mask: each entry's bit is a pure function of
(seed, offset, its linear index), so the backward regenerates the forward's mask. The stream:

  e     = ((b * H + h) * N + i) * N + j       linear index of P[b, h, i, j]
  words = Philox4x32-10(counter = (lo32(e // 4), hi32(e // 4), lo32(offset), hi32(offset)),
                        key = (lo32(seed), hi32(seed)))
  u     = words[e % 4]                        one uint32 per entry, four entries per call
  keep  = u >= threshold(p),  threshold(p) = min(floor(p * 2**32), 2**32 - 1)

Kept entries are scaled by 1 / (1 - p). The integer comparison gives every backend (C++, Triton,
this reference) the same bits. `draw_rng` takes (seed, offset) from torch's generator of the
tensors' device, so a run repeats under torch.manual_seed, and keeps it as a tensor so that
torch.compile traces the draw without a graph break.
"""
from __future__ import annotations

import torch

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_U32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The uint32 below which an entry is dropped: P(u < t) = t / 2**32 ~= p."""
    return min(int(p * 4294967296.0), _U32)


def draw_rng(device: torch.device) -> torch.Tensor:
    """(seed, offset), int64 (2,) on `device`, drawn from torch's generator for that device."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a (uint32 values in int64) times the 32-bit constant b: the 64-bit product's high and low
    # words, computed on 16-bit halves of b so that no int64 intermediate overflows.
    lo_part = a * (b & 0xFFFF)          # < 2**48
    hi_part = a * (b >> 16)             # < 2**48
    r = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2**49
    return (hi_part >> 16) + (r >> 32), r & _U32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters; returns the four output words."""
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _U32, (k1 + _KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_keep_mask(shape, p: float, rng: torch.Tensor) -> torch.Tensor:
    """The keep-mask the kernels use for maps of `shape` (B, H, N, N): bool, True = kept.

    rng: the (seed, offset) tensor that was passed to the kernels (see `draw_rng`).
    """
    seed, offset = (int(x) for x in rng.tolist())
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    numel = 1
    for s in shape:
        numel *= int(s)
    e = torch.arange(numel, dtype=torch.int64, device=rng.device)
    counter = e >> 2
    c0, c1 = counter & _U32, counter >> 32
    c2 = torch.full_like(e, offset & _U32)
    c3 = torch.full_like(e, offset >> 32)
    words = torch.stack(philox4x32(c0, c1, c2, c3, seed & _U32, seed >> 32), dim=1)
    u = words.gather(1, (e & 3).unsqueeze(1)).squeeze(1)
    return (u >= dropout_threshold(p)).reshape(tuple(int(s) for s in shape))
