"""What the initialisers need to know about a model: its attention layers and patch grid.

Works on fastattnreg's VisionTransformer and on timm's: an attention layer is any module with
a `qkv` Linear (C -> 3 * H * D, rows ordered q | k | v, head-major inside each), a `proj`
Linear (H * D -> C) and an int `num_heads`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer and the sizes read from its weights."""

    module: nn.Module
    num_heads: int  # H
    head_dim: int  # D
    dim: int  # C, the width of the layer's input tokens
    scale: float  # logit scale s (D ** -0.5 unless the layer says otherwise)

    def q_k_v_rows(self) -> tuple[slice, slice, slice]:
        """Row ranges of q, k and v inside qkv.weight (each H * D rows, head h at h*D..)."""
        width = self.num_heads * self.head_dim
        return slice(0, width), slice(width, 2 * width), slice(2 * width, 3 * width)


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Every attention layer of `model`, in module order; ValueError when there is none."""
    layers = []
    for module in model.modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        heads = getattr(module, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
                and isinstance(heads, int)):
            continue
        if qkv.out_features % (3 * heads) != 0:
            raise ValueError(f"{type(module).__name__}.qkv has {qkv.out_features} outputs, not "
                             f"3 * num_heads ({heads}) * head_dim")
        head_dim = qkv.out_features // (3 * heads)
        for norm in ("q_norm", "k_norm"):
            if not isinstance(getattr(module, norm, nn.Identity()), nn.Identity):
                raise ValueError(f"{type(module).__name__}.{norm} is set (qk_norm=True): the "
                                 "initialisers write q and k weights directly and need qk_norm=False")
        scale = float(getattr(module, "scale", head_dim**-0.5))
        layers.append(AttentionLayer(module, heads, head_dim, qkv.in_features, scale))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer (a module with a qkv "
                         "Linear, a proj Linear and num_heads)")
    return layers


def patch_grid_size(model: nn.Module) -> int:
    """Patches per side of a square grid, from model.patch_embed.grid_size (ours and timm's)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.grid_size; pass grid_size=")
    rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if rows != cols:
        raise ValueError(f"structured init needs a square patch grid; got {rows}x{cols}")
    return int(rows)


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches (class and register tokens): timm's and our attribute, else
    1 when the model has a cls_token."""
    count = getattr(model, "num_prefix_tokens", None)
    if count is None:
        count = 0 if getattr(model, "cls_token", None) is None else 1
    return int(count)


def make_generator(seed) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from torch's global RNG when seed is None."""
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else int(seed))
    return gen
