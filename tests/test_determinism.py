"""The C++ ops are deterministic: forward and backward bitwise equal across intra-op thread
counts (torch.set_num_threads 1..4), storage offsets (the same values at another offset of a
larger buffer, so at other alignments) and repeated runs.

Every op and mode: attention with each export and the LSE, with a float mask (and its gradient)
and a bool mask, with dropout at a fixed (seed, offset) and under torch.manual_seed;
attention_match (every kind and rows); refined_attention in training (with dropout and the
running-statistics update) and eval mode, with exported maps. Shapes take several query blocks
(N = 300), the BLAS paths (float64; head dim 160 > 128 in float32) and bfloat16.
"""
from contextlib import contextmanager

import pytest
import torch

from fastattnreg import attention, attention_match, refined_attention
from fastattnreg.ops.checks import ATTENTION_EXPORTS, MATCH_KINDS, MATCH_ROWS
from conftest import requires_cpp
from inputs import match_inputs, refiner_inputs

pytestmark = [requires_cpp, pytest.mark.slow]  # each case reruns an op under many settings

THREADS = (1, 2, 3, 4)
PADS = (1, 5, 16)  # elements: 4, 20 and 64 bytes off the float32 buffers' 64-byte alignment


@contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def place(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t's values at storage offset `pad` of a larger buffer, as a leaf like t."""
    if pad == 0:
        out = t.detach().clone()
    else:
        buf = torch.zeros(pad + t.numel() + 3, dtype=t.dtype)
        out = buf[pad:pad + t.numel()].view(t.shape)
        out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def _randn(gen, *shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _grads(outputs, inputs, gen):
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    got = torch.autograd.grad(outputs, inputs, ups, allow_unused=True)
    return [g for g in got if g is not None]


def attention_case(shape, dtype, export=None, mask=None, dropout=None):
    def run(pad):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (place(_randn(gen, *shape, dtype=dtype), pad).requires_grad_()
                   for _ in range(3))
        B, H, N, _ = shape
        m = None
        if mask == "float":
            m = place(_randn(gen, 1, H, N, N, dtype=dtype), pad).requires_grad_()
        elif mask == "bool":
            m = place(torch.rand(B, 1, 1, N, generator=gen) < 0.8, pad)
        inputs = [q, k, v] + ([m] if mask == "float" else [])
        if dropout == "rng":
            rng = torch.tensor([12345, -678])
            outs = list(torch.ops.fastattnreg.attention_fwd(q, k, v, m, rng, 0.125,
                                                            export or "none", 0.2))
            if export is None:
                outs.pop()
        else:
            if dropout == "seed":
                torch.manual_seed(7)
            outs = list(attention(q, k, v, attn_mask=m, export=export, return_lse=True,
                                  dropout_p=0.2 if dropout else 0.0, backend="cpp"))
        return outs + _grads(outs, inputs, gen)

    return run


def match_case(shape, dtype, kind, rows):
    def run(pad):
        gen = torch.Generator().manual_seed(1)
        drawn = [t.to(dtype) for t in match_inputs((*shape, 24), rng=gen)]
        q, k, v = (place(t, pad).requires_grad_() for t in drawn[:3])
        tq, tk = (place(t, pad) for t in drawn[3:])
        mask = place(torch.rand(shape[0], 1, 1, shape[2], generator=gen) < 0.9, pad)
        out, loss = attention_match(q, k, v, tq, tk, attn_mask=mask, kind=kind, rows=rows,
                                    backend="cpp")
        return [out, loss] + _grads([out, loss], [q, k, v], gen)

    return run


def refiner_case(shape, dtype, training, export):
    B, H, N, D = shape

    def run(pad):
        qkv, params, (means, variances) = refiner_inputs(B, H, N, D, 3, 3, dtype=dtype, seed=2)
        qkv = [place(t, pad) for t in qkv]
        params = [place(t, pad) for t in params]
        means, variances = [place(t, pad) for t in means], [place(t, pad) for t in variances]
        keep = torch.rand(B, H, N, N, generator=torch.Generator().manual_seed(3)) >= 0.1
        res = refined_attention(*qkv, *params[:3], params[3:7], params[7:11], means, variances,
                                training=training, attn_drop=0.1 if training else 0.0,
                                drop_mask=keep if training else None, export=export,
                                backend="cpp")
        outs = list(res) if export else [res]
        gen = torch.Generator().manual_seed(4)
        return outs + _grads(outs, qkv + params, gen) + [t.detach() for t in means + variances]

    return run


CASES = {
    **{f"attention-{e}-f32": attention_case((2, 3, 300, 64), torch.float32, e)
       for e in ATTENTION_EXPORTS},
    **{f"attention-{e}-f64": attention_case((2, 2, 197, 40), torch.float64, e)
       for e in ATTENTION_EXPORTS},
    "attention-full-f32-d160": attention_case((1, 3, 257, 160), torch.float32, "full"),
    "attention-cls-bf16": attention_case((2, 3, 197, 64), torch.bfloat16, "cls"),
    "attention-float-mask": attention_case((2, 3, 197, 48), torch.float32, "full", mask="float"),
    "attention-bool-mask": attention_case((2, 3, 300, 64), torch.float32, "key_mean",
                                          mask="bool"),
    "attention-dropout-rng": attention_case((2, 3, 197, 64), torch.float32, "full",
                                            mask="float", dropout="rng"),
    "attention-dropout-seed": attention_case((2, 3, 65, 64), torch.float64, None,
                                             dropout="seed"),
    **{f"match-{kd}-{r}": match_case((2, 3, 197, 48), torch.float32, kd, r)
       for kd in MATCH_KINDS for r in MATCH_ROWS},
    "refiner-train-f32": refiner_case((2, 3, 65, 32), torch.float32, True, "full"),
    "refiner-eval-f32": refiner_case((2, 3, 65, 32), torch.float32, False, "head_mean"),
    "refiner-train-f64": refiner_case((2, 2, 40, 16), torch.float64, True, None),
    "refiner-train-bf16": refiner_case((2, 3, 33, 16), torch.bfloat16, True, "cls"),
}


def assert_bitwise(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert torch.equal(a, b), f"{what}: output {i} differs by {(a - b).abs().max().item()}"


@pytest.mark.parametrize("name", list(CASES))
def test_bitwise_equal_across_threads_offsets_and_reruns(name):
    run = CASES[name]
    with num_threads(1):
        want = [t.detach() for t in run(0)]
    assert all(torch.isfinite(t.double()).all() for t in want)
    for n in THREADS[1:]:
        with num_threads(n):
            assert_bitwise([t.detach() for t in run(0)], want, f"{n} threads")
    for pad in PADS:
        assert_bitwise([t.detach() for t in run(pad)], want, f"storage offset {pad}")
    assert_bitwise([t.detach() for t in run(0)], want, "rerun")
