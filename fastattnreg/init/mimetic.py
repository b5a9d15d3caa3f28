"""Mimetic initialisation (Trockman & Kolter, arXiv 2305.09828), docs/methods.md section 2.

Trained ViTs' attention weights look like identity plus noise: per head, W_q W_k^T is close to
a positive multiple of the identity (tokens attend to similar tokens, themselves most), and the
layer's W_v W_o close to a negative one. The init writes factors whose products are

    W_q^h W_k^hT = rank-D truncation of (alpha * Z_h + beta * I)    per head h,    (C, C)
    W_v W_o      = gamma * Z' - delta * I                             whole layer,   (C, C)

with Z entries N(0, 1/C) drawn afresh for every head and layer, each product split into two
factors with equal singular values by SVD (A = U S V^T -> U sqrt(S), sqrt(S) V^T). Conventions:
a row-vector token x (C,) gives q = x W_q, k = x W_k, v = x W_v (each (C, D) per head, (C, H*D)
for the layer), and the layer's output is (attention-weighted v) W_o with W_o = proj.weight^T.
The W_v W_o split is exact when H * D = C; with H * D < C it keeps the top H * D directions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import AttentionLayer, attention_layers, make_generator


@dataclass
class MimeticInitReport:
    layers: int
    # Per layer: the exact targets the factors were cut from (float64, (H, C, C) and (C, C)),
    # kept so that a caller (and the tests) can measure how close the products came.
    qk_targets: list[torch.Tensor] = field(default_factory=list, repr=False)
    vo_targets: list[torch.Tensor] = field(default_factory=list, repr=False)


def _split(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """target (..., C, C) ~ left @ right^T with left, right (..., C, rank), by truncated SVD."""
    u, s, vh = torch.linalg.svd(target)
    root = s[..., :rank].sqrt().unsqueeze(-2)  # (..., 1, rank)
    return u[..., :rank] * root, vh[..., :rank, :].transpose(-2, -1) * root


@torch.no_grad()
def _init_layer(layer: AttentionLayer, alpha: float, beta: float, gamma: float, delta: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    H, D, C = layer.num_heads, layer.head_dim, layer.dim
    eye = torch.eye(C, dtype=torch.float64)
    z = torch.randn(H, C, C, generator=gen, dtype=torch.float64) / C**0.5
    qk_target = alpha * z + beta * eye  # (H, C, C)
    wq, wk = _split(qk_target, D)  # (H, C, D) each
    vo_target = gamma * torch.randn(C, C, generator=gen, dtype=torch.float64) / C**0.5 \
        - delta * eye
    wv, wo = _split(vo_target, H * D)  # (C, H*D) each; W_o = wo^T (H*D, C)

    qkv, proj = layer.module.qkv, layer.module.proj
    if proj.out_features != C:
        raise ValueError(f"mimetic init needs proj to map back to the layer's width {C}; got "
                         f"proj.out_features={proj.out_features}")
    q_rows, k_rows, v_rows = layer.q_k_v_rows()
    dtype = qkv.weight.dtype
    qkv.weight[q_rows] = wq.transpose(1, 2).reshape(H * D, C).to(dtype)
    qkv.weight[k_rows] = wk.transpose(1, 2).reshape(H * D, C).to(dtype)
    qkv.weight[v_rows] = wv.T.to(dtype)  # nn.Linear stores the transpose of x -> x W
    proj.weight.copy_(wo.to(proj.weight.dtype))  # proj.weight = W_o^T = wo (C, H*D)
    if qkv.bias is not None:
        qkv.bias.zero_()
    if proj.bias is not None:
        proj.bias.zero_()
    return qk_target, vo_target


def mimetic_init_(model: nn.Module, alpha: float = 0.7, beta: float = 0.7, *,
                  gamma: float = 0.4, delta: float = 0.4, seed=None) -> MimeticInitReport:
    """Mimetic init of every attention layer of `model` (ours or timm's), in place.

    alpha, beta: W_q W_k^T ~ alpha Z + beta I per head; gamma, delta: W_v W_o ~ gamma Z - delta I
    per layer (the paper's defaults 0.7, 0.7, 0.4, 0.4). qkv and proj biases are set to zero;
    everything else keeps its init. seed: an int for a reproducible draw, None for torch's
    global RNG. Returns the targets used, per layer. A NaN, infinite or negative alpha, beta,
    gamma or delta raises ValueError before any weight changes.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("delta", delta)):
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    gen = make_generator(seed)
    report = MimeticInitReport(layers=0)
    for layer in attention_layers(model):
        qk_target, vo_target = _init_layer(layer, alpha, beta, gamma, delta, gen)
        report.qk_targets.append(qk_target)
        report.vo_targets.append(vo_target)
        report.layers += 1
    return report
