"""Finding a model's FusedAttention layers and checking a user's choice among them.

Shared by the regularisers (nn/regularizers.py), which address attention layers by their index
in module order (`model.modules()`), so that `layers=[0, 5, 11]` means blocks 0, 5 and 11 of a
timm ViT built with `attn_layer=FusedAttention`, whatever the model's attribute names are.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import nn

from .attention import FusedAttention


def fused_attention_layers(model: nn.Module, what: str) -> list[FusedAttention]:
    """All FusedAttention submodules of `model` in module order; ValueError when there is none."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} must be a torch.nn.Module; got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, FusedAttention)]
    if not found:
        raise ValueError(
            f"{what} ({type(model).__name__}) has no FusedAttention layers; got 0, need at least "
            "1 (build it with attn_layer=fastattnreg.FusedAttention)"
        )
    return found


def select_indices(layers: Optional[Sequence[int]], count: int, what: str) -> tuple[int, ...]:
    """`layers` checked against `count` layers: None -> all, else distinct ints in [0, count)."""
    if layers is None:
        return tuple(range(count))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be None or a list of layer indices; got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers must name at least one layer; got an empty list")
    for i in layers:
        # bool is an int in Python, but layers=[True] is surely a mistake.
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers must hold ints; got {i!r} in {list(layers)!r}")
        if not 0 <= i < count:
            raise ValueError(
                f"layer index {i} is out of range: {what} has {count} FusedAttention layers "
                f"(indices 0..{count - 1})"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat an index; got {list(layers)!r}")
    return tuple(layers)


def check_number(name: str, value, *, positive: bool = False) -> float:
    """A finite float (and > 0 when `positive`); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return float(value)
