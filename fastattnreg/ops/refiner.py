"""refined_attention(): Refiner's attention (docs/methods.md §1), fused.

The C++ kernels (csrc/cpu/refiner.cpp) are registered as torch.ops.fastattnreg.
refined_attention_fwd / _bwd; this file adds their fake (meta) kernels and autograd rule
(ops/refiner_autograd.py), the input checks and the public `refined_attention()`. The reference
`refined_attention_ref` (plain conv2d / batch_norm) lives in ops/refiner_ref.py.

A Triton backend plugs in like ops/triton_attention.py does for attention: a module that
registers `fastattnreg::triton_refined_attention_fwd` / `_bwd` with the same schemas as the C++
ops (csrc/registration.cpp) and calls `register_refiner_autograd` on them, imported below when
Triton is installed; `_forward_op` then picks it for backend "triton".

Shapes, C = expansion * H expanded channels, K the odd depthwise kernel size:
  q, k, v (B, H, N, D); conv weights as nn.Conv2d holds them: conv_exp (C, H, 1, 1),
  conv_dw (C, 1, K, K), conv_pro (H, C, 1, 1); BatchNorm tensors as four-element sequences in
  the order bn1 (C), bn2 (C), bn3 (H), adapt_bn (H).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from .. import backend as _backend
from .autocast import CPP_DTYPES, autocast_dtype, cast_for_autocast, run_dtype
from .checks import (REFINER_EXPORTS, accumulation_dtype, check_choice, check_kernel_size,
                     check_qkv, check_scale)
from .jit import update_running_stats
from .refiner_autograd import register_refiner_autograd
from .refiner_export import check_dmaps, refiner_maps_shape
from .refiner_ref import BN_NAMES, _per_bn, refined_attention_ref

__all__ = ["refined_attention", "refined_attention_ref"]

if _backend.cpp_available():

    @torch.library.register_fake("fastattnreg::refined_attention_fwd")
    def _refined_fwd_fake(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean,
                          running_var, keep, eps, scale, drop_scale, training, save_probs,
                          export):
        B, H, N, _ = q.shape
        acc = accumulation_dtype(q.dtype)
        probs_shape = (B, H, N, N) if training or save_probs else (0,)
        y_shape = (B, H, N, N) if training else (0,)  # Y kept for the backward in training
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty(probs_shape, dtype=acc), q.new_empty(y_shape, dtype=acc),
                q.new_empty(bn_weight.shape, dtype=acc),
                q.new_empty(bn_weight.shape, dtype=acc),
                q.new_empty(refiner_maps_shape(q, export)))

    @torch.library.register_fake("fastattnreg::refined_attention_bwd")
    def _refined_bwd_fake(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, y,
                          mean, var, keep, eps, scale, drop_scale, training, dmaps, export):
        check_dmaps(dmaps, q, export)
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                     for t in (q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias))

    register_refiner_autograd("refined_attention_fwd", "refined_attention_bwd")

if _backend.triton_installed():
    from . import triton_refiner as _triton_refiner  # noqa: F401  (registers the Triton ops)


def _forward_op(impl: str):
    ops = torch.ops.fastattnreg
    if impl == "triton":
        if not hasattr(ops, "triton_refined_attention_fwd"):
            raise RuntimeError(
                "refined_attention's Triton kernels are not registered (Triton is not "
                "installed); use backend='cpp' (CPU tensors) or backend='reference'")
        return ops.triton_refined_attention_fwd
    return ops.refined_attention_fwd


# ------------------------------------------------------------------------------------ checks


def _check_four(name: str, tensors, sizes, dtype, device, same_dtype: bool) -> None:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 4:
        raise ValueError(f"{name} must be a sequence of 4 tensors (one per BatchNorm "
                         f"{BN_NAMES}); got {type(tensors).__name__}"
                         + (f" of length {len(tensors)}" if isinstance(tensors, (list, tuple)) else ""))
    for bn, t, size in zip(BN_NAMES, tensors, sizes):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} of {bn} must be a torch.Tensor; got {type(t).__name__}")
        if tuple(t.shape) != (size,):
            raise ValueError(f"{name} of {bn} must have shape ({size},); got {tuple(t.shape)}")
        if same_dtype and t.dtype != dtype:
            raise ValueError(f"{name} of {bn} must have q's dtype {dtype}; got {t.dtype}")
        if not same_dtype and not t.dtype.is_floating_point:
            raise ValueError(f"{name} of {bn} must be a floating-point tensor; got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} of {bn} must be on q's device {device}; got {t.device}")


def check_running_values(running_mean, running_var) -> None:
    """Every running mean finite, every running variance finite and >= 0 (both modes: eval
    reads them, and training would carry a NaN on into every later eval step).

    One host read for all eight tensors. Skipped while torch.compile traces (a data-dependent
    branch breaks the graph): the C++ op checks the same values when the graph runs."""
    if torch.compiler.is_compiling():
        return
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(m).all() for m in running_mean]
                         + [(torch.isfinite(v) & (v >= 0)).all() for v in running_var]).all()
        if bool(ok):
            return
        for name, tensors, good in (("running_mean", running_mean, torch.isfinite),
                                    ("running_var", running_var,
                                     lambda v: torch.isfinite(v) & (v >= 0))):
            for bn, t in zip(BN_NAMES, tensors):
                bad = (~good(t)).nonzero()
                if len(bad):
                    ch = int(bad[0, 0])
                    need = "finite" if name == "running_mean" else "finite and >= 0"
                    raise ValueError(f"{name} of {bn} channel {ch} must be {need}; got "
                                     f"{t[ch].item()!r}")


def check_refiner_args(q, conv_exp_weight, conv_dw_weight, conv_pro_weight, bn_weight, bn_bias,
                       running_mean, running_var, momentum, eps, attn_drop, drop_mask,
                       training) -> tuple[int, int]:
    """Checks everything but q, k, v themselves; returns (C, K)."""
    B, H, N, _ = q.shape
    convs = (("conv_exp_weight", conv_exp_weight), ("conv_dw_weight", conv_dw_weight),
             ("conv_pro_weight", conv_pro_weight))
    for name, w in convs:
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            got = f"{w.dim()}-D with shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{name} must be a 4-D nn.Conv2d weight; got {got}")
        if w.dtype != q.dtype or w.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}); "
                             f"got ({w.dtype}, {w.device})")
    C = conv_exp_weight.shape[0]
    if C < 1 or tuple(conv_exp_weight.shape) != (C, H, 1, 1):
        raise ValueError(f"conv_exp_weight must have shape (C, H, 1, 1) = (expansion * {H}, {H}, "
                         f"1, 1) with C >= 1 (expansion >= 1); got {tuple(conv_exp_weight.shape)}")
    K = conv_dw_weight.shape[-1]
    check_kernel_size(K, "kernel_size", "conv_dw_weight")
    if tuple(conv_dw_weight.shape) != (C, 1, K, K):
        raise ValueError(f"conv_dw_weight must be depthwise with shape (C, 1, K, K) = ({C}, 1, {K},"
                         f" {K}); got {tuple(conv_dw_weight.shape)}")
    if tuple(conv_pro_weight.shape) != (H, C, 1, 1):
        raise ValueError(f"conv_pro_weight must have shape (H, C, 1, 1) = ({H}, {C}, 1, 1); got "
                         f"{tuple(conv_pro_weight.shape)}")
    sizes = (C, C, H, H)
    _check_four("bn_weight", bn_weight, sizes, q.dtype, q.device, same_dtype=True)
    _check_four("bn_bias", bn_bias, sizes, q.dtype, q.device, same_dtype=True)
    _check_four("running_mean", running_mean, sizes, q.dtype, q.device, same_dtype=False)
    _check_four("running_var", running_var, sizes, q.dtype, q.device, same_dtype=False)
    for m in _per_bn("momentum", momentum):
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1] (or four of them); got {m!r}")
    for e in _per_bn("eps", eps):
        if (isinstance(e, bool) or not isinstance(e, (int, float))
                or not (math.isfinite(e) and e > 0)):
            raise ValueError(f"eps must be a finite number > 0 (or four of them; it keeps "
                             f"1 / sqrt(var + eps) finite for a zero variance); got {e!r}")
    check_running_values(running_mean, running_var)
    if isinstance(attn_drop, bool) or not isinstance(attn_drop, (int, float)) or not 0.0 <= attn_drop < 1.0:
        raise ValueError(f"attn_drop must be a probability in [0, 1); got {attn_drop!r}")
    if drop_mask is not None:
        if (not isinstance(drop_mask, torch.Tensor) or drop_mask.dtype != torch.bool
                or tuple(drop_mask.shape) != (B, H, N, N) or drop_mask.device != q.device):
            got = (f"{drop_mask.dtype} {tuple(drop_mask.shape)} on {drop_mask.device}"
                   if isinstance(drop_mask, torch.Tensor) else type(drop_mask).__name__)
            raise ValueError(f"drop_mask must be a bool tensor of shape {(B, H, N, N)} on "
                             f"{q.device}; got {got}")
    if training and B * N * N < 2:
        raise ValueError("training-mode BatchNorm needs more than 1 value per channel; got "
                         f"B * N * N = {B * N * N} (B={B}, N={N})")
    return C, K


# ------------------------------------------------------------------------------- public function


def refined_attention(q, k, v, conv_exp_weight, conv_dw_weight, conv_pro_weight,
                      bn_weight: Sequence[torch.Tensor], bn_bias: Sequence[torch.Tensor],
                      running_mean: Sequence[torch.Tensor], running_var: Sequence[torch.Tensor],
                      *, training: bool, momentum=0.1, eps=1e-5, scale=None,
                      attn_drop: float = 0.0, drop_mask=None, export=None,
                      backend: str = "auto"):
    """Refiner attention: softmax maps refined by expanded-head convolutions, then times v.

    Args:
        q, k, v: (B, H, N, D), one dtype and device.
        conv_exp_weight: (C, H, 1, 1), C = expansion * H (W_e, `DLA.conv_exp`).
        conv_dw_weight: (C, 1, K, K), K odd (W_d, `DLA.depth_sep_conv`).
        conv_pro_weight: (H, C, 1, 1) (W_r, `DLA.conv_pro`).
        bn_weight, bn_bias: four tensors each, the affine parameters of bn1 (C), bn2 (C), bn3 (H)
            and adapt_bn (H); q's dtype.
        running_mean, running_var: four tensors each, the running statistics of those
            BatchNorms (any floating dtype; float32 ones of a bfloat16 layer are read and
            updated in float32). Read in eval mode; in training mode updated in place
            exactly as nn.BatchNorm2d does (momentum, unbiased variance). The caller increments
            num_batches_tracked (RefinerAttention does). Every mean must be finite and every
            variance finite and >= 0, in both modes.
        training: batch statistics (True) or the running statistics (False).
        momentum, eps: one number or four (per BatchNorm), as nn.BatchNorm2d's: momentum in
            [0, 1], eps finite and > 0.
        scale: logit scale; default D ** -0.5; else 0 or a magnitude within
            ops.checks.scale_limits(q.dtype).
        attn_drop: attention-dropout probability, used only when training. The keep-mask is
            drawn here from torch's generator as a (B, H, N, N) bool tensor (or taken from
            `drop_mask`) and read by the kernels: one extra byte per map entry.
        export: None, "full" (B, H, N, N), "head_mean" (B, N, N: mean over heads) or "cls"
            (B, H, N: row 0 of each head), as fastattnreg.attention's: maps of the refined
            attention A* = BN_a(BN3(W_r F) + A), the map that meets v, in q's dtype. Written by
            the kernels' last forward pass; their gradient is folded into the backward's
            dA* = dout V^T, so it reaches q, k, the conv weights and bn_weight/bn_bias.
        backend: "auto" | "cpp" | "triton" | "reference" (see fastattnreg.backend).

    Returns:
        out (B, H, N, D), then the maps if `export` is set. Gradients flow into q, k, v, the conv
        weights and bn_weight/bn_bias.

    Autocast: inside torch.autocast on q's device, q, k, v, the conv weights and the BatchNorm
    affine parameters run in the autocast dtype (float32 ones are cast, by autograd-tracked
    copies, so their gradients stay float32): the C++ kernels take the weights and affine
    parameters in q's dtype only (float64 q is left alone, as autocast leaves float64; under
    float16 autocast the C++ kernels, which have no float16 path, run in float32). The
    running statistics are never cast: the kernels read a packed copy and the update is
    written into the given tensors in their own dtype.
    """
    check_choice("export", export, REFINER_EXPORTS)
    check_choice("backend", backend, _backend.BACKENDS)
    check_scale("scale", scale)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor; got {type(q).__name__}")
    if not isinstance(training, bool):
        raise ValueError(f"training must be a bool; got {training!r}")
    impl = _backend.resolve(backend, q.device)
    amp_dtype = autocast_dtype(q.device)
    if amp_dtype is not None and q.is_floating_point() and q.dtype != torch.float64:
        # The C++ kernels have no float16 path: they run in float32 under float16 autocast.
        if impl == "cpp":
            amp_dtype = run_dtype(amp_dtype, CPP_DTYPES)

        def cast(t):
            return cast_for_autocast(t, q.device.type, amp_dtype)

        q, k, v = cast(q), cast(k), cast(v)
        conv_exp_weight, conv_dw_weight = cast(conv_exp_weight), cast(conv_dw_weight)
        conv_pro_weight = cast(conv_pro_weight)
        if isinstance(bn_weight, (list, tuple)) and isinstance(bn_bias, (list, tuple)):
            bn_weight, bn_bias = [cast(t) for t in bn_weight], [cast(t) for t in bn_bias]
    check_qkv(q, k, v, impl)
    check_scale("scale", scale, q.dtype)
    C, K = check_refiner_args(q, conv_exp_weight, conv_dw_weight, conv_pro_weight, bn_weight,
                              bn_bias, running_mean, running_var, momentum, eps, attn_drop,
                              drop_mask, training)
    B, H, N, D = q.shape
    dropout = training and attn_drop > 0
    if dropout and drop_mask is None:
        drop_mask = torch.empty((B, H, N, N), dtype=torch.bool, device=q.device)
        drop_mask.bernoulli_(1.0 - attn_drop)
    if impl == "reference":
        # With autocast off inside: the (already cast) inputs are upcast and computed in
        # float32 as the kernels do, and F.batch_norm never sees autocast's bfloat16 conv
        # outputs next to float32 running statistics, a mix it refuses on the CPU.
        off = (torch.autocast(q.device.type, enabled=False) if amp_dtype is not None
               else contextlib.nullcontext())
        with off:
            return refined_attention_ref(q, k, v, conv_exp_weight, conv_dw_weight,
                                         conv_pro_weight, bn_weight, bn_bias, running_mean,
                                         running_var, training=training, momentum=momentum,
                                         eps=eps, scale=scale, attn_drop=attn_drop,
                                         drop_mask=drop_mask, export=export)
    fwd = _forward_op(impl)
    scale = float(D ** -0.5 if scale is None else scale)
    eps4 = [float(e) for e in _per_bn("eps", eps)]
    params = (conv_exp_weight, conv_dw_weight, conv_pro_weight, *bn_weight, *bn_bias)
    save_probs = (not training and torch.is_grad_enabled()
                  and any(t.requires_grad for t in (q, k, v, *params)))
    # The kernels read the running statistics in the accumulation type (float32 for bfloat16
    # q): float32 statistics of a bfloat16 layer reach them unrounded.
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad():
        packed_mean = torch.cat([t.to(acc) for t in running_mean])
        packed_var = torch.cat([t.to(acc) for t in running_var])
    out, _, _, mean, var, maps = fwd(
        q, k, v, conv_exp_weight.reshape(C, H), conv_dw_weight.reshape(C, K, K),
        conv_pro_weight.reshape(H, C), torch.cat(list(bn_weight)), torch.cat(list(bn_bias)),
        packed_mean, packed_var, drop_mask if dropout else None, eps4, scale,
        1.0 / (1.0 - attn_drop) if dropout else 1.0, training, save_probs,
        "none" if export is None else export)
    if training:
        update_running_stats(list(running_mean), list(running_var), mean, var,
                             [float(m) for m in _per_bn("momentum", momentum)], B * N * N)
    return out if export is None else (out, maps)
