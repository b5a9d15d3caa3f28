"""The structured init's pseudo input: a model's position embedding as its first block sees it.

A ViT adds `pos_embed` (1, L, C) to its tokens, optionally applies `norm_pre`, and every block
layer-norms its input (`norm1`) before attention. With the image content (patches, class and
register tokens) set to zero, the first block's attention therefore sees
norm1(norm_pre(P)), where P (p + g*g, C) is what the position embedding adds to each token:
its own row, or zero for a prefix token it does not cover (timm's no_embed_class=True). That
is the pseudo input the impulse heads are fitted on.

Layout (ours and timm's): `num_prefix_tokens` p tokens (class, then registers) come first;
pos_embed has g*g rows under `no_embed_class`, else p + g*g rows, prefix rows first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.pos_embed import sincos_pos_embed_2d
from .layers import AttentionLayer, num_prefix_tokens, patch_grid_size

POS_EMBED_MODES = ("write_sincos", "as_is")


@dataclass(frozen=True)
class PosEmbedLayout:
    """Where a model's position embedding sits and what it covers."""

    tensor: torch.Tensor  # model.pos_embed (1, covered + g*g, C): a Parameter or a buffer
    grid_size: int  # g
    prefix: int  # p: prefix tokens in front of the patches
    covered: int  # prefix tokens pos_embed has rows for: p, or 0 under no_embed_class


def pos_embed_layout(model: nn.Module, dim: int, grid_size: int | None) -> PosEmbedLayout:
    """Checks model.pos_embed against the grid and prefix; ValueError naming what is wrong.

    The grid is `grid_size`, else model.patch_embed.grid_size (which must be square), else
    inferred from the rows of pos_embed (they must be a square number after the prefix).
    """
    name = type(model).__name__
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        raise ValueError(
            f"{name}.pos_embed is {type(pos).__name__ if pos is not None else None}: the "
            "structured init fits each head on the position embedding the model adds to its "
            "tokens and needs a (1, tokens, C) tensor there (timm: pos_embed='learn')")
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise ValueError(f"{name}.pos_embed must have shape (1, tokens, {dim}) (C = the "
                         f"attention layers' width); got {tuple(pos.shape)}")
    prefix = num_prefix_tokens(model)
    covered = 0 if getattr(model, "no_embed_class", False) else prefix
    if grid_size is not None:
        g = int(grid_size)
    elif getattr(getattr(model, "patch_embed", None), "grid_size", None) is not None:
        g = patch_grid_size(model)
    else:
        patches = pos.shape[1] - covered
        g = math.isqrt(max(patches, 0))
        if patches < 1 or g * g != patches:
            raise ValueError(
                f"{name} has no patch_embed.grid_size and its pos_embed has {pos.shape[1]} rows "
                f"({covered} prefix rows + {patches} patches): not a square grid; pass grid_size=")
    if pos.shape[1] != covered + g * g:
        raise ValueError(
            f"{name}.pos_embed has {pos.shape[1]} rows; a {g}x{g} patch grid needs {g * g} plus "
            f"{covered} for the prefix tokens it embeds ({prefix} prefix tokens, no_embed_class="
            f"{bool(getattr(model, 'no_embed_class', False))}): {covered + g * g}")
    return PosEmbedLayout(pos, g, prefix, covered)


def sincos_rows(layout: PosEmbedLayout, dim: int) -> torch.Tensor:
    """(covered + g*g, C) float64: the 2-D sin-cos embedding, zero at the covered prefix rows
    (as VisionTransformer(pos_embed="sincos") stores it)."""
    pe = sincos_pos_embed_2d(layout.grid_size, dim, dtype=torch.float64)
    return torch.cat([pe.new_zeros(layout.covered, dim), pe])


def model_rows(layout: PosEmbedLayout) -> torch.Tensor:
    """(covered + g*g, C) float64: the model's own pos_embed as it is."""
    return layout.tensor.detach()[0].to("cpu", torch.float64)


def token_positions(layout: PosEmbedLayout, rows: torch.Tensor) -> torch.Tensor:
    """(p + g*g, C): what pos_embed adds to each token; zero for uncovered prefix tokens."""
    missing = layout.prefix - layout.covered
    return torch.cat([rows.new_zeros(missing, rows.shape[1]), rows]) if missing else rows


def find_norm1(model: nn.Module, layer: AttentionLayer) -> nn.Module:
    """The norm the block holding `layer` applies before attention: the sibling `norm1`."""
    for module in model.modules():
        if getattr(module, "attn", None) is layer.module:
            norm = getattr(module, "norm1", None)
            if isinstance(norm, nn.Module):
                return norm
            break
    raise ValueError(
        f"{type(model).__name__}: found no block with `attn` = the first attention layer "
        f"({type(layer.module).__name__}) and a `norm1` module beside it; the structured init "
        "needs the norm the block applies to its input to build the pseudo input")


@torch.no_grad()
def apply_norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for x (N, C) float64 as the model applies it, in float64 where it can.

    nn.LayerNorm: normalised in float64 with the module's eps, then its weight and bias (an
    identity LayerNorm leaves the normalised values bit for bit). Any other module runs
    itself in its own dtype and device (it is what the model runs); None / Identity: x.
    """
    if norm is None or isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (x.shape[-1],):
            raise ValueError(f"norm normalises over {tuple(norm.normalized_shape)}; the tokens "
                             f"have width {x.shape[-1]}")
        y = nn.functional.layer_norm(x, (x.shape[-1],), eps=norm.eps)
        if norm.weight is not None:
            y = y * norm.weight.detach().to("cpu", torch.float64)
        if norm.bias is not None:
            y = y + norm.bias.detach().to("cpu", torch.float64)
        return y
    param = next(iter(norm.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    return norm(x.to(device, dtype).unsqueeze(0))[0].to("cpu", torch.float64)


def pseudo_input_of(model: nn.Module, layer: AttentionLayer, positions: torch.Tensor):
    """(p + g*g, C) float64: norm1(norm_pre(positions)) with the model's own modules."""
    x = apply_norm(getattr(model, "norm_pre", None), positions)
    return apply_norm(find_norm1(model, layer), x)


@torch.no_grad()
def write_pos_embed(layout: PosEmbedLayout, rows: torch.Tensor) -> None:
    """Copies rows (covered + g*g, C) into model.pos_embed in its dtype and device."""
    layout.tensor.copy_(rows.unsqueeze(0).to(layout.tensor.dtype))
