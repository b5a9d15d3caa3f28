"""The shapes of the maps that the attention ops export, one table for every backend and layer.

`export` is the ops' string form: "full" (B, H, N, N), every head's map; "head_mean" (B, N, N),
their mean over the heads; "cls" (B, H, N), row 0 of each head; "key_mean" (B, H, N), the
attention each key receives, averaged over the queries; "none" (0,), the empty placeholder the
ops return when nothing is exported. Which exports an op accepts is its own check
(ops.checks.ATTENTION_EXPORTS, REFINER_EXPORTS). This module imports nothing of the package, so
the Triton launchers below the ops read the same table as the ops.
"""
from __future__ import annotations


def maps_shape(export: str, B: int, H: int, N: int) -> tuple[int, ...]:
    """Shape of the maps output for `export` and q of shape (B, H, N, D)."""
    shapes = {"full": (B, H, N, N), "head_mean": (B, N, N), "cls": (B, H, N),
              "key_mean": (B, H, N), "none": (0,)}
    if export not in shapes:
        raise ValueError(f"export must be one of {tuple(shapes)}; got {export!r}")
    return shapes[export]
