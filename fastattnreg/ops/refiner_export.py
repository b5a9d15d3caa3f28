"""The maps refined attention exports: the choices, their shapes, the view of A* each one takes,
and the check of a gradient handed to the raw backward ops. Shared by the reference
(ops/refiner_ref.py), the C++ ops' fake kernels (ops/refiner.py) and the Triton ops
(ops/triton_refiner.py).

A* (B, H, N, N) is the refined attention, the map that meets v. The public `export` is one of
ops.checks.REFINER_EXPORTS; the ops take a string, "none" for None (OP_EXPORTS).
"""
from __future__ import annotations

import torch

from .. import exports
from .checks import REFINER_EXPORTS, check_choice, op_exports

OP_EXPORTS = op_exports(REFINER_EXPORTS)


def export_maps(refined: torch.Tensor, export: str) -> torch.Tensor:
    """The exported view of A* (B, H, N, N): "full" itself, "head_mean" (B, N, N) its mean over
    heads, "cls" (B, H, N) row 0 of each head."""
    return {"full": lambda: refined, "head_mean": lambda: refined.mean(dim=1),
            "cls": lambda: refined[:, :, 0, :]}[export]()


def refiner_maps_shape(q: torch.Tensor, export: str) -> tuple[int, ...]:
    """Shape of the ops' maps output for q (B, H, N, D) and an op export string."""
    check_choice("export", export, OP_EXPORTS)
    return exports.maps_shape(export, *q.shape[:3])


def check_dmaps(dmaps, q: torch.Tensor, export: str) -> None:
    """A raw backward op's dmaps: None, or a tensor of the maps' shape, q's dtype and device."""
    shape = refiner_maps_shape(q, export)
    if dmaps is None:
        return
    if export == "none":
        raise ValueError("dmaps was given but export is 'none' (no maps were exported); pass "
                         "dmaps=None or the export the forward used")
    if tuple(dmaps.shape) != shape or dmaps.dtype != q.dtype or dmaps.device != q.device:
        raise ValueError(f"dmaps must have shape {shape} (export {export!r}), q's dtype {q.dtype} "
                         f"and device {q.device}; got shape {tuple(dmaps.shape)}, {dmaps.dtype} "
                         f"on {dmaps.device}")
