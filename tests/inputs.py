"""Input builders shared by the test files and the interpreter case files.

  qkv(shape, dtype)            three (B, H, N, D) tensors drawn with torch.randn in `dtype`
  qkv_on(shape, dtype, device) three tensors drawn in float64 on the CPU, then cast and moved,
                               so every dtype and device sees the same numbers
  SEQ_LENS x HEAD_DIMS, grid_shape(n, d)
                               the (N, D) grid every attention backend is tested on, with the
                               batch and head count cycling along it
  attention_mask(kind, ...)    attention()'s attn_mask in each broadcast form, for the C++ tests
  triton_attention_mask(kind, ...)
                               the Triton tests' masks, drawn on the CPU from a seed per kind
  match_inputs(shape, ...)     attention_match()'s q, k, v and the teacher's tq, tk
  match_mask(kind, ...)        attention_match()'s attn_mask in each broadcast form
  refiner_inputs(...)          refined_attention()'s q, k, v, weights and running statistics
  refiner_params(...)          the weights and running statistics alone

Each builder draws its tensors in the order its docstring lists them: a new order would change
the numbers of every test that uses it.
"""
from __future__ import annotations

import torch

SEQ_LENS = (1, 17, 65, 197, 257)  # CLS + 0, 4x4, 8x8, 14x14, 16x16 patch grids
HEAD_DIMS = (16, 48, 64, 80)
BATCH_HEADS = ((1, 1), (2, 3), (3, 2), (1, 4))


def grid_shape(n: int, d: int) -> tuple[int, int, int, int]:
    """(B, H, n, d) for a point of the SEQ_LENS x HEAD_DIMS grid: B x H cycles through
    BATCH_HEADS, so every (N, D) pair also varies the batch and head count, the same on every
    backend."""
    b, h = BATCH_HEADS[(SEQ_LENS.index(n) + HEAD_DIMS.index(d)) % len(BATCH_HEADS)]
    return b, h, n, d


def qkv(shape, dtype=torch.float64, requires_grad=True) -> list[torch.Tensor]:
    """q, k, v of `shape`, each torch.randn(shape, dtype=dtype) from the global generator."""
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def qkv_on(shape, dtype, device, requires_grad=True) -> list[torch.Tensor]:
    """q, k, v of `shape`, drawn in float64 on the CPU and then cast to `dtype` on `device`."""
    return [torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_(requires_grad) for _ in range(3)]


# ------------------------------------------------------------------------------- attention


ATTENTION_MASK_KINDS = ("key_padding", "shared_bias", "per_head_bool", "full_bias")


def attention_mask(kind: str, B: int, H: int, N: int, dtype=torch.float64,
                   dead_row=True) -> torch.Tensor:
    """A mask of one of ATTENTION_MASK_KINDS, drawn from torch's global generator; the float
    ones require grad.

    key_padding (B, 1, 1, N) bool: batch 0 keeps only key 0, batch 1 (when B > 1) its first
    half. shared_bias (N, N) of `dtype`: N(0, 1) values, a relative-position-like bias.
    per_head_bool (1, H, N, N) bool: about 40% False, the diagonal True. full_bias
    (B, H, N, N) of `dtype`: N(0, 1) values, about 20% -inf, the diagonal 0. dead_row: query
    row N // 2 of shared_bias all -inf and row N - 1 of head 0 of per_head_bool all False
    (key_padding has no dead row: every row keeps key 0)."""
    if kind == "key_padding":
        m = torch.ones(B, 1, 1, N, dtype=torch.bool)
        m[0, ..., 1:] = False
        if B > 1:
            m[1, ..., N // 2:] = False
        return m
    if kind == "shared_bias":
        m = torch.randn(N, N, dtype=dtype)
        if dead_row:
            m[N // 2, :] = float("-inf")
        return m.requires_grad_()
    if kind == "per_head_bool":
        m = torch.rand(1, H, N, N) > 0.4
        m[..., torch.arange(N), torch.arange(N)] = True
        if dead_row:
            m[0, 0, N - 1, :] = False
        return m
    if kind == "full_bias":
        m = torch.randn(B, H, N, N, dtype=dtype)
        m[torch.rand(B, H, N, N) < 0.2] = float("-inf")
        m[..., torch.arange(N), torch.arange(N)] = 0.0
        return m.requires_grad_()
    raise ValueError(f"unknown mask kind {kind!r}")


TRITON_MASK_KINDS = ("key_padding", "dead_rows", "shared_bias", "shared_bias_transposed",
                     "head_bool", "full_bias")
TRITON_FLOAT_MASK_KINDS = ("shared_bias", "shared_bias_transposed", "full_bias")


def triton_attention_mask(kind: str, B: int, H: int, N: int, dtype, device,
                          requires_grad=True) -> torch.Tensor:
    """A mask of one of TRITON_MASK_KINDS, drawn on the CPU from a generator seeded by the kind
    (every device sees the same values):

    key_padding (B, 1, 1, N) bool, the last third of the last batch's keys padded; dead_rows
    (B, 1, N, 1) bool, query 0 of batch 0 and query N-1 of the last batch see no key at all;
    shared_bias (N, N) float; shared_bias_transposed the same as a transposed (non-contiguous)
    view; head_bool (1, H, N, N) bool, about 30% False; full_bias (B, H, N, N) float with key 1
    of head (0, 0) at -inf. Float masks have `dtype` and require grad when `requires_grad`."""
    g = torch.Generator().manual_seed(1234 + TRITON_MASK_KINDS.index(kind))
    if kind == "key_padding":
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[-1, ..., N - max(1, N // 3):] = False
    elif kind == "dead_rows":
        mask = torch.ones(B, 1, N, 1, dtype=torch.bool)
        mask[0, 0, 0] = False
        mask[-1, 0, N - 1] = False
    elif kind == "head_bool":
        mask = torch.rand(1, H, N, N, generator=g) > 0.3
    elif kind in ("shared_bias", "shared_bias_transposed"):
        mask = torch.randn(N, N, generator=g, dtype=torch.float64)
    elif kind == "full_bias":
        mask = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
        if N > 1:
            mask[0, 0, :, 1] = float("-inf")
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    if mask.dtype == torch.bool:
        return mask.to(device)
    mask = mask.to(device=device, dtype=dtype)
    if kind == "shared_bias_transposed":
        mask = mask.t().contiguous().t()  # the same values, strides (1, N)
    return mask.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------- match


def match_inputs(shape, dtype=torch.float64, requires_grad=False, rng=None,
                 device="cpu") -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, D) and the teacher's tq, tk (B, H, N, Dt) for shape
    (B, H, N, D, Dt), in that order torch.randn in `dtype` on `device`; q, k, v require grad
    when `requires_grad`. rng: None draws from torch's global generator, an int from a new
    generator seeded with it, a torch.Generator from where it stands."""
    B, H, N, D, Dt = shape
    gen = torch.Generator().manual_seed(rng) if isinstance(rng, int) else rng
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, device=device, generator=gen,
                           requires_grad=requires_grad) for _ in range(3))
    tq, tk = (torch.randn(B, H, N, Dt, dtype=dtype, device=device, generator=gen)
              for _ in range(2))
    return q, k, v, tq, tk


MATCH_MASK_KINDS = ("key_padding", "per_head_bool", "shared_bias")


def match_mask(kind: str, B: int, H: int, N: int, dtype=torch.float32, device="cpu",
               seed: int | None = 0) -> torch.Tensor:
    """A mask of one of MATCH_MASK_KINDS, drawn on the CPU (every device sees the same values)
    from a generator seeded by `seed` and the kind, or with seed None from torch's global one:

    key_padding (B, 1, 1, N) bool: batch 0 keeps only keys 0 and 1 (its CLS row has one patch
    key left), batch 1 (when B > 1) its first half. per_head_bool (1, H, N, N) bool: about 40%
    False, the diagonal True; row N-1 of head 0 fully masked, and the CLS row of head H-1 keeps
    no patch key (key 0 only). shared_bias (N, N) of `dtype`: N(0, 1) values, about 20% -inf
    off the diagonal, and row N // 2 all -inf."""
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(4321 + 17 * seed + MATCH_MASK_KINDS.index(kind))
    if kind == "key_padding":
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., 2:] = False
        if B > 1:
            mask[1, ..., N // 2:] = False
    elif kind == "per_head_bool":
        mask = torch.rand(1, H, N, N, generator=g) > 0.4
        mask[..., torch.arange(N), torch.arange(N)] = True
        mask[0, 0, N - 1, :] = False
        mask[0, H - 1, 0, 1:] = False
    elif kind == "shared_bias":
        mask = torch.randn(N, N, generator=g, dtype=torch.float64)
        mask[torch.rand(N, N, generator=g) < 0.2] = float("-inf")
        mask[torch.arange(N), torch.arange(N)] = 0.0
        mask[N // 2, :] = float("-inf")
        mask = mask.to(dtype)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


# --------------------------------------------------------------------------------- refiner


# The weights refiner_params returns, in order (the refiner module's parameter names).
REFINER_PARAM_NAMES = ("conv_exp", "conv_dw", "conv_pro", "bn1.weight", "bn2.weight",
                       "bn3.weight", "adapt_bn.weight", "bn1.bias", "bn2.bias", "bn3.bias",
                       "adapt_bn.bias")


def _randn(gen: torch.Generator, shape, dtype, std=1.0, mean=0.0) -> torch.Tensor:
    """N(mean, std ** 2) values of `shape` drawn in float64 from `gen`, then cast to `dtype`."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)


def refiner_params(H: int, expansion: int, ksize: int, dtype, gen: torch.Generator,
                   requires_grad=True) -> tuple[list, tuple[list, list]]:
    """(weights, (running means, running variances)) of a refiner over H heads, with
    C = expansion * H hidden channels and a ksize x ksize depthwise kernel, away from their init
    so every term matters; drawn from `gen` in float64, in this order, then cast to `dtype`:

    weights (REFINER_PARAM_NAMES; requiring grad when `requires_grad`): conv_exp (C, H, 1, 1),
    conv_dw (C, 1, K, K) and conv_pro (H, C, 1, 1), N(0, 0.25); the weights of the BatchNorms
    over C, C, H and H channels, N(1, 0.04); their biases, N(0, 0.04). Running means N(0, 0.01)
    and running variances U(0.5, 1.5), per BatchNorm."""
    C = expansion * H
    sizes = (C, C, H, H)
    params = [_randn(gen, (C, H, 1, 1), dtype, std=0.5),
              _randn(gen, (C, 1, ksize, ksize), dtype, std=0.5),
              _randn(gen, (H, C, 1, 1), dtype, std=0.5)]
    params += [_randn(gen, (c,), dtype, std=0.2, mean=1.0) for c in sizes]
    params += [_randn(gen, (c,), dtype, std=0.2) for c in sizes]
    params = [p.requires_grad_(requires_grad) for p in params]
    means = [_randn(gen, (c,), dtype, std=0.1) for c in sizes]
    variances = [(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
                 for c in sizes]
    return params, (means, variances)


def refiner_inputs(B: int, H: int, N: int, D: int, expansion: int, ksize: int,
                   dtype=torch.float64, seed=0) -> tuple[list, list, tuple[list, list]]:
    """(q, k, v), weights, (running means, running variances) of refined_attention(), drawn
    from one generator seeded with `seed`: q, k, v (B, H, N, D) N(0, 1) requiring grad, then
    refiner_params(H, expansion, ksize)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_randn(gen, (B, H, N, D), dtype).requires_grad_() for _ in range(3))
    params, running = refiner_params(H, expansion, ksize, dtype, gen)
    return [q, k, v], params, running
