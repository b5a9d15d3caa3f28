"""What the Triton op modules (ops/triton_attention.py, ops/triton_match.py,
ops/triton_refiner.py) share: how an op is defined, the checks every raw Triton op applies to
its inputs, and the layout fixes before a launch. The raw ops skip the public functions' checks,
so these hold for direct torch.ops calls too.
Imported only when Triton is installed (see fastattnreg.backend).
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional

import torch

from ..triton import attention as _kernels
from .checks import check_qkv, check_scale


# The argument types of the Triton ops' schemas, and the Python annotation of each that
# torch.library's schema inference reads back as that type.
_ANNOTATIONS = {"Tensor": torch.Tensor, "Optional[Tensor]": Optional[torch.Tensor],
                "float": float, "str": str, "bool": bool, "List[float]": List[float]}


def schema_signature(qualname: str, schema: str) -> inspect.Signature:
    """The Python signature from which torch.library infers `schema` for the op `qualname`:
    the schema's argument names and types, and a tuple of as many Tensors as it returns (the
    inferred schema leaves the returns unnamed)."""
    parsed = torch._C.parse_schema(qualname + schema)
    params = []
    for arg in parsed.arguments:
        if arg.kwarg_only or arg.default_value is not None:
            raise ValueError(f"{qualname}: argument {arg.name} is keyword-only or has a default;"
                             f" schema_signature takes plain positional arguments only")
        kind = str(arg.type)
        if kind not in _ANNOTATIONS:
            raise ValueError(f"{qualname}: argument {arg.name} has type {kind}, which "
                             f"schema_signature does not map (it maps {sorted(_ANNOTATIONS)})")
        params.append(inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=_ANNOTATIONS[kind]))
    if any(str(r.type) != "Tensor" for r in parsed.returns):
        raise ValueError(f"{qualname}: schema_signature takes ops that return Tensors only")
    returns = tuple[(torch.Tensor,) * len(parsed.returns)]
    return inspect.Signature(params, return_annotation=returns)


def define_triton_op(name: str, impl, schema: str, fake):
    """A `torch.library.triton_op` on CUDA: impl only allocates and launches through
    `wrap_triton`, so it doubles as its own fake kernel and torch.compile sees the kernels.
    Under TRITON_INTERPRET=1 an opaque custom op with `fake`: the launchers call interpreted
    kernels directly (triton/tiles.py's `traceable`), and those cannot run on fake tensors.

    torch.library.triton_op before torch 2.14 ignores its `schema` argument and infers the
    schema from impl's annotations, so impl carries the schema's signature (`__signature__`,
    which schema inference reads): torch 2.11 (checked) registers the same arguments as 2.14,
    which also keeps the return names. The dispatcher calls impl positionally, so the names it
    binds are impl's own."""
    if _kernels.INTERPRET:
        op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        return op
    impl.__signature__ = schema_signature(name, schema)
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
