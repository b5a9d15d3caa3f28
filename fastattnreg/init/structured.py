"""Structured (impulse) initialisation of attention, docs/methods.md section 2.

Every head starts out attending like one tap of a k x k convolution: on the g x g patch grid,
token (r, c) attends to (r + m, c + n) for the head's offset (m, n). The queries and keys that
do this are found on a pseudo input P_e (p + g*g, C), the model's position embedding as its
first block's attention sees it (norm1(norm_pre(pos)), see pos_input.py), and written into the
q and k rows of every attention layer's `qkv`. The method prescribes the fixed 2-D sin-cos
embedding: by default it is written into the model's `pos_embed` first (pos_embed=
"write_sincos"), so the heads are impulses on the embedding the model actually adds.

Prefix tokens (class and register tokens). Their pseudo-input rows are what pos_embed adds to
them, normed: zero under the sin-cos embedding (its prefix rows are zero) or no_embed_class,
and with norm1's bias zero (its default) and q/k biases zeroed every logit in their rows and
columns is then exactly 0 whatever W_q, W_k are: the class query attends uniformly, and each
patch query sees the class key at logit 0. Both methods keep the prefix keys in every patch
row's softmax (target 0 there, so the impulse must beat them, as it has to at run time) and
leave the prefix queries' rows out of the target and the loss. That uniform class row holds in
the first block only: later blocks' class tokens carry content, their queries pass through the
fitted W_q, and their rows peak on a few fixed keys. The method is meant for models that pool
the patch tokens (class_token=False, global_pool="avg"), as its authors train it.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.pos_embed import sincos_pos_embed_2d
from ..ops.checks import check_choice
from .layers import AttentionLayer, attention_layers, make_generator
from .pos_input import (POS_EMBED_MODES, model_rows, pos_embed_layout, pseudo_input_of,
                        sincos_rows, token_positions, write_pos_embed)

METHODS = ("fit", "closed_form")
OFFSET_MODES = ("random", "ordered")


@dataclass
class StructuredInitReport:
    """What structured_init_ did; `error` is the fit's final value of fit_error()."""

    method: str
    kernel_size: int
    grid_size: int
    offsets: list[tuple[int, int]]  # (row, col) shift per head, the same in every layer
    error: float  # fit_error: over heads and impulse rows, sum_j (P_ij - T_ij)^2, pseudo input
    steps: int  # Adam steps taken (0 for the closed form)
    seconds: float
    converged: bool  # error <= target_error (both methods)
    layers: int  # attention layers written
    hits: list[float] = field(default_factory=list)  # per head: argmax hit rate on valid rows
    # The embedding the fit used: "write_sincos" (the 2-D sin-cos one, written into model.pos_embed)
    # or "as_is" (the model's own pos_embed, unchanged).
    pos_embed: str = "write_sincos"
    pos_embed_frozen: bool = False  # model.pos_embed has no gradient (a buffer, or frozen)
    prefix_tokens: int = 0  # p: class and register tokens in front of the patches


def pseudo_input(grid_size: int, dim: int) -> torch.Tensor:
    """(g*g, C) layer-normed (no affine, eps 1e-6) 2-D sin-cos embedding, float64: the patch
    rows of the pseudo input of a ViT with the sin-cos embedding and default norm1."""
    pe = sincos_pos_embed_2d(grid_size, dim, dtype=torch.float64)
    return nn.functional.layer_norm(pe, (dim,), eps=1e-6)


def impulse_offsets(num_heads: int, kernel_size: int, mode: str,
                    generator: torch.Generator) -> list[tuple[int, int]]:
    """One (m, n) in [-k//2, k//2]^2 per head.

    "random": uniform over the k*k taps, repeats allowed (the paper's choice). "ordered": the
    centre first, then ring by ring outwards (row-major inside a ring), cycling when there are
    more heads than taps.
    """
    r = kernel_size // 2
    taps = [(m, n) for m in range(-r, r + 1) for n in range(-r, r + 1)]
    if mode == "random":
        idx = torch.randint(len(taps), (num_heads,), generator=generator).tolist()
        return [taps[i] for i in idx]
    taps.sort(key=lambda t: max(abs(t[0]), abs(t[1])))  # stable: row-major within a ring
    return [taps[h % len(taps)] for h in range(num_heads)]


def impulse_targets(grid_size: int, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(H, g*g, g*g) float64: T[h, (r,c), (r+m, c+n)] = 1; rows shifted off the grid are 0."""
    g = grid_size
    targets = torch.zeros(len(offsets), g * g, g * g, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    for h, (m, n) in enumerate(offsets):
        ok = (r + m >= 0) & (r + m < g) & (c + n >= 0) & (c + n < g)
        rows = torch.nonzero(ok).squeeze(1)
        targets[h, rows, (r[ok] + m) * g + (c[ok] + n)] = 1.0
    return targets


def fit_error(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over heads and impulse rows of the row's squared error sum_j (P_ij - T_ij)^2.

    Only rows with a target on the grid count (a row with an all-zero target cannot be matched
    by a softmax). 0 is a perfect impulse; a row that puts probability p on its target scores
    at least (1 - p)^2, e.g. 0.05 means about 78% of the mass or more on the target.
    """
    valid = targets.sum(-1) > 0  # (H, N)
    return (probs - targets).square().sum(-1)[valid].mean()


def fit_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's objective: the squared error over every row, rows shifted off the grid
    (all-zero targets, which pull their softmax towards uniform) included."""
    return (probs - targets).square().sum(-1).mean()


def _head_logits(pe: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, scale: float,
                 prefix: int) -> torch.Tensor:
    """s * P_e W_q^h (P_e W_k^h)^T for the patch queries of all heads: (H, N, N + p).

    pe (N + p, C) with the p prefix rows first; wq, wk (H, C, D).
    """
    return scale * (pe[prefix:] @ wq) @ (pe @ wk).transpose(1, 2)


def _head_maps(pe, wq, wk, scale: float, prefix: int) -> torch.Tensor:
    """The patch queries' softmax rows, (H, N, N + p)."""
    return _head_logits(pe, wq, wk, scale, prefix).softmax(-1)


def _prefix(targets: torch.Tensor) -> int:
    """Prefix tokens p of targets (H, N, N + p)."""
    return targets.shape[-1] - targets.shape[-2]


def fit_qk(pe: torch.Tensor, targets: torch.Tensor, head_dim: int, scale: float, *,
           steps: int, lr: float, target_error: float, rescale_every: int,
           generator: torch.Generator):
    """Adam fit of W_q^h, W_k^h (C, D) per head to the targets in softmax space (float32).

    pe (N + p, C) and targets (H, N, N + p), prefix rows and key columns first.
    Minimises fit_loss. Init uniform +-(1 / (D * H)) ** 0.5; every `rescale_every` steps each
    column is rescaled to the mean column norm it had at init (keeps the logits from growing
    without bound). Stops as soon as fit_error <= target_error (checked on the maps of the
    loss's own forward, so it costs nothing). Returns (wq, wk, error, steps_taken).
    """
    H, C, prefix = targets.shape[0], pe.shape[1], _prefix(targets)
    bound = (1.0 / (head_dim * H)) ** 0.5
    wq, wk = ((torch.rand(H, C, head_dim, generator=generator) * 2 - 1) * bound
              for _ in range(2))
    norms = [w.norm(dim=1).mean(dim=1, keepdim=True).unsqueeze(1) for w in (wq, wk)]  # (H,1,1)
    wq.requires_grad_(True)
    wk.requires_grad_(True)
    pe32, t32 = pe.float(), targets.float()
    opt = torch.optim.Adam([wq, wk], lr=lr)
    error = math.inf
    taken = 0
    for taken in range(steps + 1):
        probs = _head_maps(pe32, wq, wk, scale, prefix)
        loss = fit_loss(probs, t32)
        error = fit_error(probs.detach(), t32).item()
        if error <= target_error or taken == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (taken + 1) % rescale_every == 0:
            with torch.no_grad():
                for w, norm in zip((wq, wk), norms):
                    w.mul_(norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return wq.detach().double(), wk.detach().double(), error, taken


def closed_form_qk(pe: torch.Tensor, targets: torch.Tensor, head_dim: int, scale: float, *,
                   peak_logit: float, noise: float, rtol: float, margin: float,
                   generator: torch.Generator):
    """Closed form: W = pinv(P_e) L pinv(P_e)^T / s, truncated to rank D by SVD, per head.

    pe (N + p, C) and targets (H, N, N + p), prefix rows and key columns first. L (H, N, N + p)
    is the logit-space target of the patch queries: `peak_logit` on the impulse, N(0, noise^2)
    elsewhere (prefix keys and rows shifted off the grid: noise only); the prefix queries are
    not fitted. W ~ U S V^T gives W_q = U sqrt(S), W_k = V sqrt(S)
    (both (C, D)). Two choices of ours, both because P_e is numerically low-rank (the layer-
    normed sin-cos embedding of a 16x16 grid at C=192 has ~17 singular values above 1e-3 of the
    largest): the pseudo-inverse drops singular values below `rtol` times the largest (the
    default pinv keeps ~1e-15 ones and turns them into weights of norm 1e6), and W_q, W_k are
    then rescaled by one factor per head so that the median over impulse rows of (impulse logit
    - largest other logit) is `margin` on the pseudo input (the argmax is unchanged by this).
    """
    prefix = _prefix(targets)
    pinv = torch.linalg.pinv(pe, rtol=rtol)  # (C, N + p)
    logits = peak_logit * targets + noise * torch.randn(targets.shape, generator=generator,
                                                        dtype=targets.dtype)
    w = pinv[:, prefix:] @ logits @ pinv.T / scale  # (H, C, C)
    u, s, vh = torch.linalg.svd(w)
    root = s[:, :head_dim].sqrt().unsqueeze(1)  # (H, 1, D)
    wq, wk = u[:, :, :head_dim] * root, vh[:, :head_dim, :].transpose(1, 2) * root
    fitted = _head_logits(pe, wq, wk, scale, prefix)  # (H, N, N + p)
    on_target = (fitted * targets).sum(-1)
    best_other = fitted.masked_fill(targets.bool(), -math.inf).amax(-1)
    valid = targets.sum(-1) > 0
    gap = torch.stack([(on_target - best_other)[h][valid[h]].median()
                       for h in range(targets.shape[0])])  # (H,)
    # Logits are bilinear in (W_q, W_k): scaling both by c scales the gap by c^2. A head whose
    # median gap is not positive failed; it is left unscaled and shows in the report's hits.
    c = torch.where(gap > 0, (margin / gap.clamp_min(1e-30)).sqrt(), torch.ones_like(gap))
    return wq * c.view(-1, 1, 1), wk * c.view(-1, 1, 1)


def with_prefix_keys(targets: torch.Tensor, prefix: int) -> torch.Tensor:
    """(H, N, N) -> (H, N, N + p): zero target on the p prefix keys, which come first."""
    return torch.nn.functional.pad(targets, (prefix, 0)) if prefix else targets


def argmax_hits(maps: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per head: the fraction of rows with a target whose row-wise argmax is the target."""
    valid = targets.sum(-1) > 0  # (H, N)
    hit = (maps.argmax(-1) == targets.argmax(-1)) & valid
    return (hit.sum(-1).double() / valid.sum(-1).clamp_min(1)).tolist()


@torch.no_grad()
def _write_qk(layer: AttentionLayer, wq: torch.Tensor, wk: torch.Tensor) -> None:
    """Writes W_q^h, W_k^h (H, C, D) into the q and k rows of qkv; zeroes their biases."""
    qkv = layer.module.qkv
    q_rows, k_rows, _ = layer.q_k_v_rows()
    dim = layer.dim
    for rows, w in ((q_rows, wq), (k_rows, wk)):
        # q = x W_q with x (N, C): nn.Linear stores W_q^T, head h in rows h*D..(h+1)*D.
        qkv.weight[rows] = w.transpose(1, 2).reshape(-1, dim).to(qkv.weight.dtype)
        if qkv.bias is not None:
            qkv.bias[rows] = 0.0


@contextmanager
def single_thread():
    """Runs the block with one intra-op thread, then restores the count.

    The fit is thousands of small ops ((N, C) @ (C, D) with N <= 1025): OpenMP's fork/join per
    op costs more than it saves, and on a busy 2-core machine it made a step 18x slower
    (69 ms vs 3.9 ms at 4x4 tokens, 64 dims, 4 heads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _check_number(name: str, value, positive: bool) -> None:
    """A finite real number, > 0 (positive) or >= 0."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}; "
                         f"got {value!r}")


def structured_init_(model: nn.Module, kernel_size: int = 3, method: str = "fit",
                     offsets: str = "random", seed=None, *, pos_embed: str = "write_sincos",
                     freeze_pos_embed: bool = False, grid_size: int | None = None,
                     steps: int = 10_000, lr: float = 1e-2, target_error: float = 0.05,
                     rescale_every: int = 100, peak_logit: float = 10.0,
                     noise: float = 0.1, rtol: float = 1e-2,
                     margin: float = 8.0) -> StructuredInitReport:
    """Impulse-initialises the q and k weights of every attention layer of `model`, in place.

    The heads are fitted on the model's own pseudo input: the position embedding it adds to
    its tokens (`model.pos_embed`, (1, L, C), class/register rows first unless timm's
    no_embed_class), through `norm_pre` when the model has one and the norm1 of the block
    holding the first attention layer, as the model applies them (pos_input.py). The image
    content (patches, the class and register tokens' own values) is not part of it. Every
    block gets the same W_q, W_k, so a later block whose norm1 differs from the first's (not
    at init, where all are equal) sees them on a differently scaled input.

    pos_embed: which embedding that is.
      "write_sincos" (default): the method's fixed 2-D sin-cos embedding is written into
        model.pos_embed (a learned parameter, e.g. timm's default, or our sincos buffer, which
        already holds it bit for bit), zero at the prefix rows it covers, and the fit runs on
        it. A learned embedding stays trainable unless freeze_pos_embed.
      "as_is": the fit runs on model.pos_embed as it is (e.g. a trained embedding); nothing
        but q and k is written. On a random embedding the heads can only tell the tokens
        apart while they are few next to the width (8x8 tokens at C=64: 94% argmax hits; 16x16
        at C=64: no convergence in 10k steps, 72%): see report.hits and report.converged.
    freeze_pos_embed: sets model.pos_embed.requires_grad_(False) (a parameter), keeping the
    embedding the heads were fitted on fixed during training.

    method: "fit" (Adam on the softmax-space squared error, stopping once fit_error reaches
    `target_error` or after `steps`; lr 1e-2 rather than the paper's 1e-4, our choice, so that
    the early stop comes within seconds) or "closed_form" (logit-space target, pinv and rank-D
    SVD, see closed_form_qk; the follow-up paper uses offsets="ordered" with it). offsets:
    "random" per head (drawn from `seed`; None draws from torch's global RNG) or "ordered"
    (centre first, ring by ring). The same W_q, W_k go into every layer and the q and k biases
    are set to zero; v, proj, the MLPs, norms and tokens are not touched. Works on fastattnreg's
    and timm's VisionTransformer (see layers.py), with or without a class token, register
    tokens, no_embed_class, dynamic_img_size (the fit is at the stored grid); prefix tokens as
    the module docstring says. grid_size: patches per side, by default patch_embed.grid_size
    (square), else inferred from pos_embed.

    Everything is checked before any weight changes; ValueError (naming what was found and
    what is needed) for: a non-integer or too small steps (>= 0), rescale_every or grid_size
    (>= 1); lr, peak_logit, rtol or margin not finite and > 0; target_error or noise not finite
    and >= 0; no pos_embed tensor, a non-square or uninferable grid, a pos_embed
    whose rows or width do not fit the grid, prefix tokens and layers, no block `norm1` beside
    the first attention layer, qk_norm, or layers of different sizes.

    Returns a StructuredInitReport (error, steps, time, offsets, the embedding used and
    per-head argmax hit rates on the pseudo input).
    """
    check_choice("method", method, METHODS)
    check_choice("offsets", offsets, OFFSET_MODES)
    check_choice("pos_embed", pos_embed, POS_EMBED_MODES)
    if not isinstance(freeze_pos_embed, bool):
        raise ValueError(f"freeze_pos_embed must be a bool; got {freeze_pos_embed!r}")
    if kernel_size not in (3, 5):
        raise ValueError(f"kernel_size must be 3 or 5; got {kernel_size}")
    _check_int("steps", steps, 0)
    _check_int("rescale_every", rescale_every, 1)
    if grid_size is not None:
        _check_int("grid_size", grid_size, 1)
    _check_number("lr", lr, positive=True)
    _check_number("target_error", target_error, positive=False)
    _check_number("peak_logit", peak_logit, positive=True)
    _check_number("noise", noise, positive=False)
    _check_number("rtol", rtol, positive=True)
    _check_number("margin", margin, positive=True)
    layers = attention_layers(model)
    first = layers[0]
    for layer in layers[1:]:
        if (layer.num_heads, layer.head_dim, layer.dim) != (first.num_heads, first.head_dim,
                                                             first.dim):
            raise ValueError("structured_init_ writes one fit into every layer; the layers' "
                             "(heads, head_dim, dim) differ")
    start = time.perf_counter()
    layout = pos_embed_layout(model, first.dim, grid_size)
    g, prefix = layout.grid_size, layout.prefix
    if g <= kernel_size // 2:  # an offset of k // 2 would leave no query with a target
        raise ValueError(f"the patch grid ({g}x{g}) is too small for kernel_size={kernel_size}: "
                         f"it needs more than {kernel_size // 2} patches per side")
    # (covered + g*g, C) float64: the embedding the fit uses (and, for "write_sincos", writes).
    rows = sincos_rows(layout, first.dim) if pos_embed == "write_sincos" else model_rows(layout)
    # (p + g*g, C) and (H, g*g, p + g*g): the patch queries against every key, prefix first.
    pe = pseudo_input_of(model, first, token_positions(layout, rows))
    if not torch.isfinite(pe).all():
        raise ValueError("the pseudo input (pos_embed through norm_pre and norm1) is not finite")
    gen = make_generator(seed)
    head_offsets = impulse_offsets(first.num_heads, kernel_size, offsets, gen)
    targets = with_prefix_keys(impulse_targets(g, head_offsets), prefix)
    if method == "fit":
        with single_thread():
            wq, wk, error, taken = fit_qk(pe, targets, first.head_dim, first.scale, steps=steps,
                                          lr=lr, target_error=target_error,
                                          rescale_every=rescale_every, generator=gen)
    else:
        wq, wk = closed_form_qk(pe, targets, first.head_dim, first.scale,
                                peak_logit=peak_logit, noise=noise, rtol=rtol, margin=margin,
                                generator=gen)
        taken = 0
    maps = _head_maps(pe, wq, wk, first.scale, prefix)
    error = fit_error(maps, targets).item()
    if pos_embed == "write_sincos":
        write_pos_embed(layout, rows)
    if freeze_pos_embed:
        layout.tensor.requires_grad_(False)
    for layer in layers:
        _write_qk(layer, wq, wk)
    return StructuredInitReport(
        method=method, kernel_size=kernel_size, grid_size=g, offsets=head_offsets,
        error=error, steps=taken, seconds=time.perf_counter() - start,
        converged=error <= target_error, layers=len(layers),
        hits=argmax_hits(maps, targets), pos_embed=pos_embed,
        pos_embed_frozen=not layout.tensor.requires_grad, prefix_tokens=prefix)
