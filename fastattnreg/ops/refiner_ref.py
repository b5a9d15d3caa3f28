"""refined_attention_ref: Refiner's attention in plain PyTorch (conv2d + batch_norm), from
docs/methods.md §1. The fused op (ops/refiner.py) is tested against it, and the benchmark uses
it as the eager module users run today.

The attention map A (B, H, N, N) is an image with H channels whose two spatial axes are the
query and the key index (CLS included, zero "same" padding). With C = expansion * H:
    A  = dropout(P)                       P = softmax(scale * q k^T)
    E  = ReLU6(BN1(W_e * A))              W_e (C, H, 1, 1)
    F  = ReLU6(BN2(W_d * E))              W_d (C, 1, k, k), depthwise, padding k // 2
    G  = BN3(W_r * F)                     W_r (H, C, 1, 1)
    A* = BN_a(G + A)
    out = A* v                            (B, H, N, D)
BatchNorm statistics are per channel over (B, N, N): batch statistics in training (the running
statistics are updated in place exactly as nn.BatchNorm2d does, through F.batch_norm), the
running statistics in eval. The exported maps are taken from A*, the refined map that meets v.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .checks import REFINER_EXPORTS, check_choice
from .refiner_export import export_maps

BN_NAMES = ("bn1", "bn2", "bn3", "adapt_bn")


def _per_bn(name: str, value) -> tuple:
    """A float (or None) for all four BatchNorms, or a sequence of four."""
    if isinstance(value, (list, tuple)):
        if len(value) != 4:
            raise ValueError(f"{name} must be one value or four (one per BatchNorm {BN_NAMES}); "
                             f"got {len(value)}")
        return tuple(value)
    return (value,) * 4


def refined_attention_ref(q, k, v, conv_exp_weight, conv_dw_weight, conv_pro_weight,
                          bn_weight: Sequence[torch.Tensor], bn_bias: Sequence[torch.Tensor],
                          running_mean: Sequence[torch.Tensor],
                          running_var: Sequence[torch.Tensor], *, training: bool,
                          momentum=0.1, eps=1e-5, scale=None, attn_drop: float = 0.0,
                          drop_mask=None, export=None, upcast: bool = True):
    """Refiner attention with every intermediate materialised; same arguments as
    `refined_attention` (see there). Returns out (B, H, N, D), then the maps of A* (q's dtype)
    if `export` is set.

    drop_mask: (B, H, N, N) bool keep-mask for attention dropout (kept entries are scaled by
    1 / (1 - attn_drop)); drawn here with torch's generator when None. Used only in training
    with attn_drop > 0. upcast=True computes bfloat16/float16 in float32.
    """
    check_choice("export", export, REFINER_EXPORTS)
    momentum, eps = _per_bn("momentum", momentum), _per_bn("eps", eps)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    weights = (conv_exp_weight, conv_dw_weight, conv_pro_weight, *bn_weight, *bn_bias)
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        weights = tuple(w.float() for w in weights)
    w_exp, w_dw, w_pro = weights[:3]
    gammas, betas = weights[3:7], weights[7:11]
    ksize = w_dw.shape[-1]

    probs = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, N, N)
    attn = probs
    if training and attn_drop > 0:
        if drop_mask is None:
            drop_mask = torch.rand_like(probs) >= attn_drop
        attn = probs * drop_mask.to(probs.dtype) * (1.0 / (1.0 - attn_drop))

    def bn(x, i):
        # Running statistics are kept in their own dtype; F.batch_norm wants x's.
        rm, rv = running_mean[i], running_var[i]
        if rm.dtype == x.dtype:
            return F.batch_norm(x, rm, rv, gammas[i], betas[i], training, momentum[i], eps[i])
        rm_x, rv_x = rm.to(x.dtype), rv.to(x.dtype)
        y = F.batch_norm(x, rm_x, rv_x, gammas[i], betas[i], training, momentum[i], eps[i])
        if training:
            with torch.no_grad():
                rm.copy_(rm_x)
                rv.copy_(rv_x)
        return y

    e = F.relu6(bn(F.conv2d(attn, w_exp), 0))                                # (B, C, N, N)
    f = F.relu6(bn(F.conv2d(e, w_dw, padding=ksize // 2, groups=w_dw.shape[0]), 1))
    g = bn(F.conv2d(f, w_pro), 2)                                            # (B, H, N, N)
    refined = bn(g + attn, 3)                                                # A* (B, H, N, N)
    out = (refined @ v).to(dtype)
    if export is None:
        return out
    return out, export_maps(refined, export).to(dtype)
