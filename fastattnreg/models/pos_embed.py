"""Fixed 2-D sine-cosine position embedding of a square patch grid.

Used by VisionTransformer(pos_embed="sincos") and, layer-normed, as the pseudo input of the
structured initialisation (fastattnreg.init.structured).
"""
from __future__ import annotations

import torch


def sincos_pos_embed_2d(grid_size: int, dim: int, *, temperature: float = 10000.0,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(grid_size**2, dim) embedding of the grid's tokens in row-major order.

    The first half of the channels encodes the row index, the second half the column index;
    each half is [sin(pos * w_0..w_{F-1}), cos(pos * w_0..w_{F-1})] with F = dim / 4 frequencies
    w_i = temperature ** (-i / F). Shifting a token by (m, n) rotates every (sin, cos) pair by a
    fixed angle, which is why an impulse (shift) attention pattern is linear in this embedding.
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be at least 1; got {grid_size}")
    if dim < 4 or dim % 4 != 0:
        raise ValueError(f"a 2-D sin-cos embedding needs dim divisible by 4; got dim={dim}")
    freqs = dim // 4
    omega = temperature ** (-torch.arange(freqs, dtype=torch.float64) / freqs)  # (F,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (g, g) each

    def encode(coord: torch.Tensor) -> torch.Tensor:  # (g*g,) -> (g*g, 2F)
        angle = coord.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).to(dtype)
