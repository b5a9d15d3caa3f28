"""What the Triton op modules (ops/triton_attention.py, ops/triton_match.py,
ops/triton_refiner.py) share: how an op is defined, the checks every raw Triton op applies to
its inputs, and the layout fixes before a launch. The raw ops skip the public functions' checks,
so these hold for direct torch.ops calls too.
Imported only when Triton is installed (see fastattnreg.backend).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..triton import attention as _kernels
from .checks import check_qkv, check_scale


def define_triton_op(name: str, impl, schema: str, fake):
    """A `torch.library.triton_op` on CUDA: impl only allocates and launches through
    `wrap_triton`, so it doubles as its own fake kernel and torch.compile sees the kernels.
    Under TRITON_INTERPRET=1 an opaque custom op with `fake`: wrap_triton hands interpreted
    kernels back unwrapped, and those cannot run on fake tensors."""
    if _kernels.INTERPRET:
        op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, impl, mutates_args=(), schema=schema)


def check_triton_inputs(q, k, v, scale: float, export: str, exports: tuple) -> None:
    """q, k, v (B, H, N, D) within the Triton limits, a finite scale within
    ops.checks.scale_limits, export one of the op's `exports` strings, tensors on a device the
    kernels run on, and B * H within one CUDA grid axis."""
    check_qkv(q, k, v, "triton")
    if export not in exports:
        raise ValueError(f"export must be one of {exports}; got {export!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale}")
    check_scale("scale", scale, q.dtype)  # 0 or within scale_limits(q.dtype)
    # Fake tensors report the device they stand for, so tracing passes this check too.
    if q.device.type != "cuda" and not _kernels.INTERPRET:
        raise RuntimeError(
            f"the Triton kernels take CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set "
            f"before importing fastattnreg); got q on {q.device}"
        )
    B, H = q.shape[:2]
    if B * H > _kernels.MAX_GRID_Z:
        raise ValueError(
            f"batch x heads must be at most {_kernels.MAX_GRID_Z} for the Triton kernels (a CUDA "
            f"grid axis); got B={B} x H={H} = {B * H}"
        )


def check_tensor(t: torch.Tensor, name: str, shape, dtype: torch.dtype,
                 device: torch.device) -> None:
    """t has exactly this shape, dtype and device."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}; got {t.device}")


def check_saved_attention(q, out, lse, dout, dlse) -> None:
    """What an attention backward reads besides q, k, v: the forward's out (q's shape) and
    float32 lse (B, H, N), and the incoming dout and dlse when given."""
    B, H, N, _ = q.shape
    check_tensor(out, "out", q.shape, q.dtype, q.device)
    check_tensor(lse, "lse", (B, H, N), torch.float32, q.device)
    if dout is not None:
        check_tensor(dout, "dout", q.shape, q.dtype, q.device)
    if dlse is not None:
        check_tensor(dlse, "dlse", (B, H, N), torch.float32, q.device)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 along D: the kernels take any batch/head/token strides (timm's permuted
    q, k, v are read in place) but need a unit stride on the last axis."""
    return t if t.stride(-1) == 1 else t.contiguous()


def contiguous_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()
