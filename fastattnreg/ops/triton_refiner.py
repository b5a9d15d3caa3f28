"""The Triton Refiner kernels as torch ops: fastattnreg::triton_refined_attention_fwd / _bwd.

Same schemas and outputs as the C++ ops refined_attention_fwd / _bwd (csrc/registration.cpp),
registered like ops/triton_attention.py: `torch.library.triton_op`s on CUDA (the implementation
only allocates, launches through `wrap_triton` and runs torch ops, so it is its own fake kernel),
opaque `custom_op`s with the fake kernels below under TRITON_INTERPRET=1. The autograd rule is
the one the C++ ops use (ops/refiner_autograd.py); ops/refiner.py's `_forward_op` picks these
for backend "triton". Kernels and what they store: fastattnreg/triton/refiner.py.
Imported only when Triton is installed (see fastattnreg.backend).
"""
from __future__ import annotations

import math

import torch

from ..triton import refiner as _kernels
from .checks import check_kernel_size
from .refiner_autograd import register_refiner_autograd
from .refiner_export import check_dmaps, refiner_maps_shape
from .triton_ops import check_tensor, check_triton_inputs, define_triton_op, unit_stride

FWD_NAME = "fastattnreg::triton_refined_attention_fwd"
BWD_NAME = "fastattnreg::triton_refined_attention_bwd"
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor w_exp, Tensor w_dw, Tensor w_pro, Tensor bn_weight, "
    "Tensor bn_bias, Tensor running_mean, Tensor running_var, Tensor? keep, float[] eps, "
    "float scale, float drop_scale, bool training, bool save_probs, str export) "
    "-> (Tensor out, Tensor probs, Tensor y, Tensor mean, Tensor var, Tensor maps)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor w_exp, Tensor w_dw, Tensor w_pro, "
    "Tensor bn_weight, Tensor bn_bias, Tensor probs, Tensor y, Tensor mean, Tensor var, "
    "Tensor? keep, "
    "float[] eps, float scale, float drop_scale, bool training, Tensor? dmaps, str export) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dw_exp, Tensor dw_dw, Tensor dw_pro, "
    "Tensor dbn_weight, Tensor dbn_bias)"
)


# ------------------------------------------------------------------------------------ checks
# The raw ops skip refined_attention()'s checks; these hold for direct torch.ops calls too.


def _check_args(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, scale, drop_scale,
                training) -> tuple[int, int]:
    """Checks what both ops take; returns (C, K)."""
    check_triton_inputs(q, k, v, scale, "none", ("none",))
    B, H, N, _ = q.shape
    _kernels.check_grid(B, H)
    if w_exp.dim() != 2 or w_exp.shape[0] < 1:
        raise ValueError(f"w_exp must be 2-D (C, H) with C = expansion * H >= 1 expanded "
                         f"channels; got shape {tuple(w_exp.shape)}")
    C = w_exp.shape[0]
    check_tensor(w_exp, "w_exp", (C, H), q.dtype, q.device)
    if w_dw.dim() != 3:
        raise ValueError(f"w_dw must be 3-D (C, K, K); got shape {tuple(w_dw.shape)}")
    K = w_dw.shape[-1]
    check_kernel_size(K, "the depthwise kernel size K", "w_dw")
    check_tensor(w_dw, "w_dw", (C, K, K), q.dtype, q.device)
    check_tensor(w_pro, "w_pro", (H, C), q.dtype, q.device)
    check_tensor(bn_weight, "bn_weight", (2 * C + 2 * H,), q.dtype, q.device)
    check_tensor(bn_bias, "bn_bias", (2 * C + 2 * H,), q.dtype, q.device)
    if len(eps) != 4:
        raise ValueError(f"eps must hold 4 values (bn1, bn2, bn3, adapt); got {len(eps)}")
    for e in eps:
        if not (math.isfinite(e) and e > 0):
            raise ValueError(f"eps must be finite and > 0; got {e}")
    if not (math.isfinite(drop_scale) and drop_scale >= 1):
        raise ValueError(f"drop_scale = 1 / (1 - attn_drop) must be finite and >= 1; got "
                         f"{drop_scale}")
    if keep is not None:
        check_tensor(keep, "keep (the dropout mask)", (B, H, N, N), torch.bool, q.device)
    if training and B * N * N < 2:
        raise ValueError(f"training-mode BatchNorm needs more than 1 value per channel; got "
                         f"B * N * N = {B * N * N}")
    return C, K


def _check_fwd(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep,
               eps, scale, drop_scale, training, export) -> None:
    refiner_maps_shape(q, export)  # a known export string
    C, _ = _check_args(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, scale,
                       drop_scale, training)
    H = q.shape[1]
    # q's dtype or float32, the kernels' accumulation type (refined_attention passes float32).
    # Their values (finite means, finite variances >= 0) are checked by refined_attention: here
    # that would read them back from the GPU on every call.
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"{name} must have q's dtype {q.dtype} or torch.float32; got "
                             f"{t.dtype}")
        check_tensor(t, name, (2 * C + 2 * H,), t.dtype, q.device)


def _check_bwd(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, mean, var, keep, eps,
               scale, drop_scale, training, dmaps, export) -> None:
    C, _ = _check_args(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, scale,
                       drop_scale, training)
    B, H, N, _ = q.shape
    check_tensor(dout, "dout", q.shape, q.dtype, q.device)
    check_dmaps(dmaps, q, export)
    if probs.numel() > 0 or training:
        if training and probs.numel() == 0:
            raise ValueError(f"probs must be the (B, H, N, N) P saved by a training-mode forward;"
                             f" got shape {tuple(probs.shape)}")
        check_tensor(probs, "probs", (B, H, N, N), torch.float32, q.device)
    check_tensor(mean, "mean", (2 * C + 2 * H,), torch.float32, q.device)
    check_tensor(var, "var", (2 * C + 2 * H,), torch.float32, q.device)


# ------------------------------------------------------------------------- implementations


def _fwd_impl(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep,
                eps, scale, drop_scale, training, save_probs, export):
    _check_fwd(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep,
               eps, scale, drop_scale, training, export)
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    keep = keep.contiguous() if training and keep is not None else None  # eval: no dropout
    out, probs, mean, var, maps = _kernels.refined_fwd(
        q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep, eps,
        scale, drop_scale, training, save_probs, export)
    # y: the Triton backward recomputes Y, so none is kept (the schema's y is for the C++ kernel).
    return out, probs, probs.new_empty((0,)), mean, var, maps


def _bwd_impl(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, y, mean, var,
                keep, eps, scale, drop_scale, training, dmaps, export):
    del y  # never kept by _fwd_impl
    _check_bwd(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, mean, var, keep, eps,
               scale, drop_scale, training, dmaps, export)
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    keep = keep.contiguous() if training and keep is not None else None
    return _kernels.refined_bwd(dout.contiguous(), q, k, v, w_exp, w_dw, w_pro, bn_weight,
                                bn_bias, probs.contiguous(), mean, var, keep, eps, scale,
                                drop_scale, training, dmaps, export)


def _fwd_fake(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep,
              eps, scale, drop_scale, training, save_probs, export):
    _check_fwd(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var, keep,
               eps, scale, drop_scale, training, export)
    B, H, N, _ = q.shape
    f32 = {"dtype": torch.float32}
    probs_shape = (B, H, N, N) if training or save_probs else (0,)
    return (q.new_empty(q.shape), q.new_empty(probs_shape, **f32), q.new_empty((0,), **f32),
            q.new_empty(bn_weight.shape, **f32), q.new_empty(bn_weight.shape, **f32),
            q.new_empty(refiner_maps_shape(q, export)))


def _bwd_fake(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, y, mean, var, keep,
              eps, scale, drop_scale, training, dmaps, export):
    _check_bwd(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, mean, var, keep, eps,
               scale, drop_scale, training, dmaps, export)
    return tuple(t.new_empty(t.shape) for t in (q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias))


triton_refined_attention_fwd = define_triton_op(FWD_NAME, _fwd_impl, FWD_SCHEMA, _fwd_fake)
triton_refined_attention_bwd = define_triton_op(BWD_NAME, _bwd_impl, BWD_SCHEMA, _bwd_fake)

register_refiner_autograd(FWD_NAME.split("::")[1], BWD_NAME.split("::")[1])
