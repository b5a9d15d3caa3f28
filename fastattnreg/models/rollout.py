"""Attention rollout (Abnar & Zuidema, 2020) over the maps of VisionTransformer.attention_maps.

Each block's map is fused over heads, mixed with the identity for the residual path and
renormalised; the blocks' matrices are multiplied from the first to the last block, so row i of
the result says how much each input token flows into output token i.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..ops.checks import check_choice

HEAD_FUSIONS = ("mean", "max", "min")


def attention_rollout(maps: Sequence[torch.Tensor], *, head_fusion: str = "mean",
                      residual: float = 0.5, discard_ratio: float = 0.0) -> torch.Tensor:
    """(B, N, N) rollout of per-block maps, each (B, H, N, N) ("full") or (B, N, N) ("head_mean").

    residual: weight of the identity mixed into every block's map (0.5: the residual stream and
    the attention weigh equally); discard_ratio: the fraction of each row's smallest entries set
    to 0 before renormalising (the class-token column is always kept).
    """
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1]; got {residual}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1); got {discard_ratio}")
    if len(maps) == 0:
        raise ValueError("maps must hold at least one block's map; got an empty sequence")
    result = None
    for i, m in enumerate(maps):
        if m.dim() == 4:  # (B, H, N, N)
            m = {"mean": m.mean(1), "max": m.amax(1), "min": m.amin(1)}[head_fusion]
        if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
            raise ValueError(f"maps[{i}] must be (B, H, N, N) or (B, N, N); got {tuple(m.shape)}")
        if discard_ratio > 0:
            n_drop = int(m.shape[-1] * discard_ratio)
            if n_drop:
                low = m.topk(n_drop, dim=-1, largest=False).indices
                low_mask = torch.zeros_like(m, dtype=torch.bool).scatter_(-1, low, True)
                low_mask[..., 0] = False
                m = m.masked_fill(low_mask, 0.0)
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        a = (1.0 - residual) * m + residual * eye
        a = a / a.sum(-1, keepdim=True)
        if result is None:
            result = a
        elif result.shape != a.shape:
            raise ValueError(f"maps[{i}] has shape {tuple(a.shape)} after head fusion; the "
                             f"earlier maps had {tuple(result.shape)}")
        else:
            result = a @ result
    return result


def cls_rollout_grid(rollout: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, g, g): the class token's row of a rollout over the patch tokens, as an image."""
    B, N, _ = rollout.shape
    if N != grid_size**2 + 1:
        raise ValueError(f"rollout has N={N} tokens; a class token plus a {grid_size}x{grid_size} "
                         f"grid needs {grid_size**2 + 1}")
    return rollout[:, 0, 1:].reshape(B, grid_size, grid_size)
