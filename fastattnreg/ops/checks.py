"""Input checks shared by every op and backend: one place, one wording.

Each error names the argument, the value it had and the limit it broke.
"""
from __future__ import annotations

import math

import torch

# The values of the ops' string arguments and the refiner's kernel-size limit, one definition
# each: the references, the C++ and Triton wrappers and the nn modules all read these.
ATTENTION_EXPORTS = (None, "full", "head_mean", "cls", "key_mean")  # attention(export=...)
REFINER_EXPORTS = (None, "full", "head_mean", "cls")  # refined_attention(export=...)
MATCH_KINDS = ("kl", "mse_probs", "mse_logits")  # attention_match(kind=...)
MATCH_ROWS = ("all", "cls")  # attention_match(rows=...)
REFINER_MAX_KERNEL_SIZE = 15  # the depthwise kernel's largest side (csrc/cpu/refiner.cpp too)


def op_exports(exports: tuple) -> tuple:
    """The raw ops' export strings for a public export tuple: "none" stands for None."""
    return tuple("none" if e is None else e for e in exports)


# Head-dim and dtype limits per backend. The reference takes anything PyTorch can multiply.
HEAD_DIM_LIMITS = {"cpp": (1, 256), "triton": (16, 128), "reference": (1, None)}
DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def check_kernel_size(K: int, name: str, source: str) -> None:
    """The Refiner's depthwise kernel size K, read from the weight `source`: odd (zero 'same'
    padding keeps an N-token grid only with an odd kernel) and at most REFINER_MAX_KERNEL_SIZE."""
    if K % 2 == 0 or not 1 <= K <= REFINER_MAX_KERNEL_SIZE:
        raise ValueError(f"{name} must be odd and in [1, {REFINER_MAX_KERNEL_SIZE}] (zero 'same' "
                         f"padding needs an odd kernel); got {K} from {source}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type every backend computes logits, softmax and BatchNorm statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_limits(dtype: torch.dtype) -> tuple[float, float]:
    """(smallest, largest) magnitude of a nonzero logit scale for inputs of `dtype`.

    The scale must be a normal number of the accumulation type (below its smallest normal value
    the kernels' copy of the scale loses bits or becomes 0) no larger than the square root of
    the type's largest value: a logit scale * (q . k) then stays finite for every |q . k| up to
    the same bound, the type's range split evenly between the scale and the dot product.
    float32: [1.18e-38, 1.84e19]; float64: [2.23e-308, 1.34e154]. csrc/checks.h applies the
    same rule.
    """
    info = torch.finfo(accumulation_dtype(dtype))
    return info.tiny, math.sqrt(info.max)


def check_scale(name: str, scale, dtype: torch.dtype | None = None) -> None:
    """None (the default D ** -0.5) or a finite number; with `dtype` (q's), also 0 or a
    magnitude within scale_limits(dtype)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name} must be None or a finite number; got {scale!r}")
    if dtype is None or scale == 0:
        return
    lo, hi = scale_limits(dtype)
    if not lo <= abs(scale) <= hi:
        acc = str(accumulation_dtype(dtype)).replace("torch.", "")
        given = str(dtype).replace("torch.", "")
        raise ValueError(
            f"{name} must be 0 or have a magnitude in [{lo:g}, {hi:g}] (a normal {acc} number "
            f"whose square is finite; {given} inputs are computed in {acc}); got {scale!r}")


def check_qkv(q, k, v, backend: str, names=("q", "k", "v")) -> None:
    """q, k, v: (B, H, N, D) tensors of one shape, dtype and device, valid for `backend`."""
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, N, D); got {t.dim()}-D with shape {tuple(t.shape)}"
            )
    qn, kn, vn = names
    for name, t in ((kn, k), (vn, v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of {qn} {tuple(q.shape)}; got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{qn}, {kn}, {vn} must share one dtype; got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"{qn}, {kn}, {vn} must be on one device; got {q.device} and {t.device}"
            )
    allowed = DTYPES[backend]
    if q.dtype not in allowed:
        raise ValueError(
            f"{qn} dtype must be one of {[str(d) for d in allowed]} for backend '{backend}'; "
            f"got {q.dtype}"
        )
    B, H, N, D = q.shape
    for axis, size in (("batch B", B), ("heads H", H), ("tokens N", N)):
        if size < 1:
            raise ValueError(f"{qn} {axis} must be at least 1; got shape {tuple(q.shape)}")
    lo, hi = HEAD_DIM_LIMITS[backend]
    if D < lo or (hi is not None and D > hi):
        limit = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"head dim D must be in {limit} for backend '{backend}'; got {D}")


def check_attn_mask(attn_mask, q, name: str = "attn_mask") -> None:
    """attn_mask: None, or a bool mask (True = takes part) or an additive float bias of q's dtype,
    of rank 2..4, broadcastable to (B, H, N, N) and on q's device (SDPA's meaning)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"{name} must be None or a torch.Tensor; got {type(attn_mask).__name__}")
    B, H, N, _ = q.shape
    target = (B, H, N, N)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise ValueError(
            f"{name} must be torch.bool (True = takes part) or q's dtype {q.dtype} (an additive "
            f"bias); got {attn_mask.dtype}"
        )
    if not 2 <= attn_mask.dim() <= 4:
        raise ValueError(
            f"{name} must have 2 to 4 dims and broadcast to (B, H, N, N) = {target}; got shape "
            f"{tuple(attn_mask.shape)}"
        )
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if any(s not in (1, t) for s, t in zip(shape, target)):
        raise ValueError(
            f"{name} of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, N, N) = "
            f"{target}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}; got {attn_mask.device}")


def check_dropout_p(dropout_p) -> None:
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")


def check_match_mask_needs_no_grad(attn_mask) -> None:
    """attention_match's mask shapes the teacher's logits too, and the teacher gets no gradient:
    a float mask that requires grad is refused rather than given half its gradient."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError(
            "attn_mask of attention_match must not require grad: the mask also shapes the "
            "teacher's logits, whose gradient is not computed; pass attn_mask.detach(), or use "
            "attention() for a learned bias")
