"""Hypothesis strategies and comparison helpers for tests/test_properties.py.

Inputs are built from leaf tensors through the views a caller makes (`Layout`): gradients are
compared with respect to the leaves, so they also cover how autograd carries them back through a
permuted, offset, expanded or transposed view.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

# Attention's thresholds (csrc/cpu/attention_kernels.h, score_gemm.h, rowops.h): query blocks of
# kTileElems / N rows (80 Ki elements: 1 block up to N = 286, 2 from 287, 3 from 405, 4 from
# 496, 5 from 573), the key-operand switch at 192 keys, 16-lane tails.
SEQ_EDGES = (1, 2, 15, 16, 17, 31, 32, 33, 63, 65, 191, 192, 193, 197, 286, 287, 404, 405, 495,
             496, 572, 573, 600)
# The float32 score kernel takes head dims up to 128 and narrow products from n = 48; the CPU
# kernels take D up to 256; 16-lane tails.
HEAD_EDGES = (1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 79, 80, 127, 128, 129, 160,
              255, 256)
LAYOUTS = ("contiguous", "timm", "offset", "expanded_batch", "expanded_heads", "transposed")
MASK_SHAPES = ("NN", "B11N", "1HNN", "BHNN", "B1NN")


def _spread(edges, max_value: int, edge_share: float):
    """A value from `edges` with probability edge_share, else uniform in [1, max_value].

    Drawn through a seeded random.Random: hypothesis's own integer and choice draws lean
    strongly towards small values (four in five attention examples had a single query block),
    while the thresholds of interest sit at the top of the range. Failing examples still print
    their drawn sizes (the tests label them)."""

    @st.composite
    def draw_one(draw):
        rnd = draw(st.randoms(use_true_random=True))
        if rnd.random() < edge_share:
            return rnd.choice(edges)
        return rnd.randint(1, max_value)

    return draw_one()


def seq_lens(max_n: int = 600):
    return _spread([n for n in SEQ_EDGES if n <= max_n], max_n, 0.6)


def head_dims(max_d: int = 256):
    return _spread([d for d in HEAD_EDGES if d <= max_d], max_d, 0.6)


@st.composite
def batch_heads(draw, n: int, per_head: int, budget: int, max_b: int = 3, max_h: int = 4):
    """(B, H) with B * H * per_head <= budget (per_head: the work of one head, e.g. N * N)."""
    room = max(1, budget // max(1, per_head))
    b = draw(st.integers(1, max(1, min(max_b, room))))
    h = draw(st.integers(1, max(1, min(max_h, room // b))))
    return b, h


class Layout:
    """Three (B, H, N, D) tensors q, k, v as views of leaf tensors, the way callers make them.

    contiguous: one leaf each. timm: one (B, N, 3 * H * D) leaf, reshaped and permuted as timm's
    Attention does (non-contiguous, head stride D). offset: one flat leaf holding q, k, v one
    after another from a storage offset (`pad` elements, 64-byte misaligned for odd pads).
    expanded_batch / expanded_heads: (1, H, N, D) / (B, 1, N, D) leaves expanded (stride 0).
    transposed: (B, H, D, N) leaves, transposed (stride N along D).
    """

    def __init__(self, kind: str, shape, pad: int = 0):
        self.kind, self.shape, self.pad = kind, tuple(shape), pad

    def __repr__(self):
        return f"Layout({self.kind!r}, {self.shape}, pad={self.pad})"

    def leaves(self, dtype, gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
        B, H, N, D = self.shape

        def rnd(*s):
            return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype)

        if self.kind == "timm":
            shapes = [(B, N, 3 * H * D)]
        elif self.kind == "offset":
            shapes = [(self.pad + 3 * B * H * N * D,)]
        elif self.kind == "expanded_batch":
            shapes = [(1, H, N, D)] * 3
        elif self.kind == "expanded_heads":
            shapes = [(B, 1, N, D)] * 3
        elif self.kind == "transposed":
            shapes = [(B, H, D, N)] * 3
        else:
            shapes = [self.shape] * 3
        return [rnd(*s).requires_grad_() for s in shapes]

    def views(self, leaves):
        B, H, N, D = self.shape
        if self.kind == "timm":
            return leaves[0].reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if self.kind == "offset":
            n = B * H * N * D
            flat = leaves[0]
            return tuple(flat[self.pad + i * n:self.pad + (i + 1) * n].view(B, H, N, D)
                         for i in range(3))
        if self.kind.startswith("expanded"):
            return tuple(t.expand(B, H, N, D) for t in leaves)
        if self.kind == "transposed":
            return tuple(t.transpose(-1, -2) for t in leaves)
        return tuple(leaves)


@st.composite
def layouts(draw, shape):
    kind = draw(st.sampled_from(LAYOUTS))
    pad = draw(st.sampled_from([1, 3, 16, 17])) if kind == "offset" else 0
    return Layout(kind, shape, pad)


def mask_shape(code: str, B: int, H: int, N: int) -> tuple[int, ...]:
    return {"NN": (N, N), "B11N": (B, 1, 1, N), "1HNN": (1, H, N, N), "BHNN": (B, H, N, N),
            "B1NN": (B, 1, N, N)}[code]


@st.composite
def masks(draw, B: int, H: int, N: int, dtype, gen: torch.Generator, grad_ok: bool = True):
    """None, a bool mask or a float bias (maybe requiring grad) of a broadcast shape, maybe a
    transposed (non-contiguous) view, maybe with a fully masked query row."""
    kind = draw(st.sampled_from([None, "bool", "float"]))
    if kind is None:
        return None
    shape = mask_shape(draw(st.sampled_from(MASK_SHAPES)), B, H, N)
    transposed = draw(st.booleans()) and shape[-2] == shape[-1]
    dead_row = draw(st.booleans())
    if kind == "bool":
        keep = draw(st.sampled_from([0.9, 0.5]))
        m = torch.rand(shape, generator=gen) < keep
        if dead_row and shape[-2] == N:
            m[..., N // 2, :] = False
    else:
        m = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
        if draw(st.booleans()):  # some -inf entries: keys masked by the bias
            m = m.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
        if dead_row and shape[-2] == N:
            m[..., N // 2, :] = float("-inf")
    if transposed:
        m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "float" and grad_ok and draw(st.booleans()):
        m.requires_grad_()
    return m


def subset(draw, names):
    """A non-empty subset of `names`, in order."""
    picked = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    return [n for n in names if n in picked]


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.detach().double(), want.detach().double()
    finite = torch.isfinite(w) & torch.isfinite(g)
    return (g[finite] - w[finite]).abs().max().item() if finite.any() else 0.0


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, name: str,
                 floor: float = 0.0) -> None:
    """Same shape, the same infinities at the same places, and finite entries within
    tol * max(1, largest |want|) + floor."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    g, w = got.detach().double(), want.detach().double()
    finite = torch.isfinite(w)
    assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite entries differ"
    assert torch.equal(g[~finite], w[~finite]), f"{name}: infinities differ"
    if finite.any():
        err = (g[finite] - w[finite]).abs().max().item()
        size = max(1.0, w[finite].abs().max().item())
        assert err <= tol * size + floor, \
            f"{name}: error {err:.3g} > {tol:g} * {size:.3g} + {floor:.3g}"


def grads_or_zeros(outputs, inputs, upstream):
    """d(sum <outputs, upstream>) / d(inputs); zeros where an input took no part."""
    got = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]
