"""Masks, attention dropout and the key_mean export of the Triton attention ops, on CPU tensors
under Triton's interpreter.

Not collected by a plain `pytest` run: test_triton_attention.py runs it in a child process with
TRITON_INTERPRET=1 (tests/interpreter_runner.py); -k interp_<group> runs one group by hand:
  masks     every mask kind x every export against attention_ref (float64), forward and every
            gradient (dq, dk, dv and the float masks' dmask); fully masked rows; map zeros.
  dropout   the kernels' keep-mask is ops.dropout.dropout_keep_mask (against the reference given
            that mask, and read back from P V with one-hot values), p = 0 and reruns bitwise,
            the public attention() draw, 64-bit indices of the stream.
  maskops   the raw ops' checks of mask, dropout_p and rng; opcheck; torch.compile(fullgraph).
To run it by hand:
    TRITON_INTERPRET=1 python -m pytest -q tests/triton_attention_mask_cases.py
Shapes are small (the interpreter is slow) and awkward: N = 17 (one partial 64-wide tile) and 65
(two tiles, the second with one row/key).
"""
import itertools
import os

import pytest
import torch
import triton
import triton.language as tl

import fastattnreg
from fastattnreg import attention
from fastattnreg.ops.checks import ATTENTION_EXPORTS
from fastattnreg.ops.dropout import draw_rng, dropout_keep_mask, dropout_threshold, philox4x32
from fastattnreg.triton.dropout import dropout_keep
from conftest import FP32_TOL, cpp_schema
from inputs import TRITON_FLOAT_MASK_KINDS, TRITON_MASK_KINDS, qkv, triton_attention_mask
from triton_attention_checks import triton_attention
from triton_attention_mask_checks import (
    assert_compiled_mask_dropout_matches_eager, compare_with_reference, full_keep_view,
    inf_aware_err, low_precision_mask_errors, triton_op_run,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fastattnreg.triton_available(),
    reason="needs TRITON_INTERPRET=1 set before the import and Triton installed",
)

SMALL, TWO_TILES = (2, 2, 17, 16), (1, 2, 65, 32)


def _assert_errors(errors, tol=FP32_TOL):
    print(", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err <= tol, f"{name}: {err:.3g}"


# ------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("kind", TRITON_MASK_KINDS)
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_interp_masks_against_reference(kind, export):
    _assert_errors(compare_with_reference(SMALL, kind, export, 0.0, "cpu"))


# Two query and key tiles per head: each mask kind once, the exports cycled.
@pytest.mark.parametrize("kind,export",
                         list(zip(TRITON_MASK_KINDS, itertools.cycle(ATTENTION_EXPORTS[1:]))))
def test_interp_masks_two_tiles(kind, export):
    _assert_errors(compare_with_reference(TWO_TILES, kind, export, 0.0, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,export,p", [("key_padding", "full", 0.0), ("dead_rows", "cls", 0.1),
                                           ("full_bias", "key_mean", 0.0),
                                           ("shared_bias", None, 0.5)])
def test_interp_masks_low_precision_rule(kind, export, p, dtype):
    """fp16/bf16 (bf16 dots in fp32 on bf16-rounded operands in the interpreter): each output
    and gradient, dmask included, within twice the error of attention_ref run in that dtype."""
    errors = low_precision_mask_errors(SMALL, kind, export, p, "cpu", dtype)
    for name, (got, ref) in errors.items():
        assert got <= 2 * ref + 1e-5, f"{name}: error {got:.3g} > 2 x reference error {ref:.3g}"


def test_interp_masks_dead_rows_are_zero_with_lse_minus_inf():
    """A query that sees no key: out 0, every map 0 on its row, LSE -inf, zero gradients."""
    B, H, N, D = SMALL
    q, k, v = qkv(SMALL, torch.float32)
    mask = triton_attention_mask("dead_rows", B, H, N, torch.float32, "cpu")
    dead = ~mask[:, 0, :, 0]  # (B, N)
    out, lse, full = triton_op_run(q, k, v, mask, None, 0.0, "full")
    _, _, cls = triton_op_run(q, k, v, mask, None, 0.0, "cls")
    assert dead.sum() == 2 and dead[0, 0] and dead[-1, N - 1]
    dead_h = dead[:, None, :].expand(B, H, N)
    assert (out[dead_h] == 0).all() and (full[dead_h] == 0).all()
    assert torch.isneginf(lse[dead_h]).all() and torch.isfinite(lse[~dead_h]).all()
    assert (cls[0] == 0).all()  # query 0 of batch 0 is dead
    dq, dk, dv = torch.autograd.grad((out.sum() + full.sum() + lse[~dead_h].sum()), (q, k, v))
    assert (dq[dead_h] == 0).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("kind", TRITON_MASK_KINDS)
def test_interp_masks_masked_entries_of_the_maps_are_exactly_zero(kind):
    B, H, N, D = SMALL
    q, k, v = qkv(SMALL, torch.float32, requires_grad=False)
    mask = triton_attention_mask(kind, B, H, N, torch.float32, "cpu", requires_grad=False)
    _, _, full = triton_op_run(q, k, v, mask, None, 0.0, "full")
    takes_part = full_keep_view(mask, (B, H, N, N))
    assert (full[~takes_part] == 0).all() and (full[takes_part] > 0).all()


@pytest.mark.parametrize("kind", TRITON_FLOAT_MASK_KINDS)
def test_interp_masks_dmask_is_dlogits_of_the_full_shape(kind):
    """The backward op's dmask is (B, H, N, N) dL/d(logits) = dS; the autograd rule sums it to
    the mask's shape. dS of a row sums to the LSE's gradient (softmax rows sum to 1)."""
    B, H, N, D = SMALL
    q, k, v = qkv(SMALL, torch.float32, requires_grad=False)
    mask = triton_attention_mask(kind, B, H, N, torch.float32, "cpu", requires_grad=False)
    out, lse, _ = triton_op_run(q, k, v, mask, None, 0.0, None)
    dlse = torch.randn_like(lse)
    bwd = torch.ops.fastattnreg.triton_attention_bwd
    args = (None, q, k, v, out, lse, dlse, None, mask, None, 0.25, "none", 0.0)
    dq, dk, dv, dmask = bwd(*args, True)
    assert dmask.shape == (B, H, N, N) and dmask.dtype == torch.float32
    assert inf_aware_err(dmask.sum(-1), dlse) < 1e-5
    *_, no_dmask = bwd(*args, False)
    assert no_dmask.shape == (0,)


# ----------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("kind,export", [(None, None), (None, "full"), ("key_padding", "cls"),
                                         ("dead_rows", "head_mean"), ("shared_bias", "key_mean"),
                                         ("head_bool", "full"), ("full_bias", None)])
def test_interp_dropout_against_reference_with_the_same_keep_mask(kind, export, p):
    _assert_errors(compare_with_reference(SMALL, kind, export, p, "cpu"))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_interp_dropout_two_tiles_large_seed_and_offset(p):
    """Seed and offset above 2**32: both words of each go into the stream."""
    rng = (2**61 + 12345, 2**40 + 77)
    _assert_errors(compare_with_reference(TWO_TILES, "shared_bias", "full", p, "cpu", rng=rng))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_interp_dropout_keep_mask_read_back_from_one_hot_values(p):
    """v[b, h, j] = e_j (N <= D) makes out[b, h, i, j] = P_ij * keep_ij / (1 - p): the kernel's
    own keep-mask, compared with dropout_keep_mask entry by entry."""
    B, H, N, D = 2, 2, 17, 32
    q, k = torch.randn(B, H, N, D) * 0.3, torch.randn(B, H, N, D) * 0.3
    v = torch.eye(N, D).expand(B, H, N, D).contiguous()
    rng = torch.tensor([987654321, 42])
    out, _, full = triton_op_run(q, k, v, None, rng, p, "full")
    assert (full > 0).all()
    kernel_keep = out[..., :N] != 0
    want = dropout_keep_mask((B, H, N, N), p, rng)
    assert torch.equal(kernel_keep, want)
    assert 0 < (~want).sum() < want.numel()
    assert inf_aware_err(out[..., :N], full * want / (1 - p)) < 1e-6
    assert (out[..., N:] == 0).all()


def test_interp_dropout_p0_is_bitwise_the_run_without_dropout():
    q, k, v = qkv(SMALL, torch.float32)
    mask = triton_attention_mask("shared_bias", 2, 2, 17, torch.float32, "cpu")
    rng = torch.tensor([5, 6])

    def run(rng_arg):
        outs = list(triton_op_run(q, k, v, mask, rng_arg, 0.0, "full"))
        return outs + list(torch.autograd.grad(outs, (q, k, v, mask),
                                               [torch.ones_like(o) for o in outs]))

    for a, b in zip(run(None), run(rng)):
        assert torch.equal(a, b)
    plain = attention(q, k, v, attn_mask=mask, backend="triton")
    assert torch.equal(plain, attention(q, k, v, attn_mask=mask, dropout_p=0.0, backend="triton"))


def test_interp_dropout_same_rng_is_bitwise_equal_and_another_differs():
    q, k, v = qkv(SMALL, torch.float32)

    def run(rng):
        outs = list(triton_op_run(q, k, v, None, torch.tensor(rng), 0.3, "key_mean"))
        return outs + list(torch.autograd.grad(outs, (q, k, v),
                                               [torch.ones_like(o) for o in outs]))

    first, second, other = run([11, 22]), run([11, 22]), run([11, 23])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], other[1]) and torch.equal(first[2], other[2])  # lse, maps


def test_interp_dropout_public_attention_draws_from_torchs_generator():
    """attention(dropout_p=p) takes (seed, offset) from torch's generator: the same draw made
    by hand gives the reference the kernels' keep-mask; a rerun under the same seed repeats."""
    q, k, v = qkv(SMALL, torch.float32, requires_grad=False)
    torch.manual_seed(7)
    out = attention(q, k, v, dropout_p=0.2, backend="triton")
    torch.manual_seed(7)
    rng = draw_rng(q.device)
    keep = dropout_keep_mask((2, 2, 17, 17), 0.2, rng)
    want = fastattnreg.attention_ref(q.double(), k.double(), v.double(), dropout_p=0.2,
                                     dropout_mask=keep)
    assert inf_aware_err(out, want) < FP32_TOL
    torch.manual_seed(7)
    assert torch.equal(out, attention(q, k, v, dropout_p=0.2, backend="triton"))


@triton.jit
def _keep_probe(Rng, Out, z, N, threshold, BLOCK: tl.constexpr):
    """Out (BLOCK, BLOCK) int8: dropout_keep of rows 0..BLOCK-1 and the last BLOCK keys of head
    z (z is a plain integer here, so it can stand for any head)."""
    rows = tl.arange(0, BLOCK)
    cols = N - BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(tl.load(Rng), tl.load(Rng + 1), z, rows, cols, N, threshold)
    tl.store(Out + rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], keep.to(tl.int8))


def test_interp_dropout_stream_uses_64_bit_indices():
    """The kernels' keep function at linear indices past 2**34 (e // 4 has a high word) against
    ops.dropout.philox4x32 evaluated on the same indices."""
    z, N, block, p = 70000, 5003, 16, 0.5
    rng = torch.tensor([2**50 + 3, 2**33 + 9])
    out = torch.empty(block, block, dtype=torch.int8)
    _keep_probe[(1,)](rng, out, z, N, dropout_threshold(p), BLOCK=block)
    rows = torch.arange(block, dtype=torch.int64)[:, None]
    cols = (N - block + torch.arange(block, dtype=torch.int64))[None, :]
    e = (z * N + rows) * N + cols
    assert e.min() > 2**34
    seed, offset = rng.tolist()
    counter = e >> 2
    words = philox4x32(counter & 0xFFFFFFFF, counter >> 32, torch.full_like(e, offset & 0xFFFFFFFF),
                       torch.full_like(e, offset >> 32), seed & 0xFFFFFFFF, seed >> 32)
    u = torch.stack(words, -1).gather(-1, (e & 3)[..., None])[..., 0]
    assert torch.equal(out.bool(), u >= dropout_threshold(p))


# ----------------------------------------------------------------------------------- maskops


def _raw(shape=SMALL):
    return qkv(shape, torch.float32, requires_grad=False)


@pytest.mark.parametrize(
    "extra,match",
    [
        ((torch.ones(17, 17, dtype=torch.float64), None, 0.0),
         r"attn_mask must be torch.bool \(True = takes part\) or q's dtype torch.float32 .*got "
         r"torch.float64"),
        ((torch.ones(17, dtype=torch.bool), None, 0.0),
         r"attn_mask must have 2 to 4 dims .*got shape \(17,\)"),
        ((torch.ones(2, 2, 1, 17, 17, dtype=torch.bool), None, 0.0),
         r"attn_mask must have 2 to 4 dims .*got shape \(2, 2, 1, 17, 17\)"),
        ((torch.ones(3, 1, 1, 17, dtype=torch.bool), None, 0.0),
         r"attn_mask of shape \(3, 1, 1, 17\) does not broadcast to \(B, H, N, N\) = "
         r"\(2, 2, 17, 17\)"),
        ((torch.ones(17, 17, dtype=torch.bool, device="meta"), None, 0.0),
         r"attn_mask must be on q's device cpu; got meta"),
        ((None, None, 1.0), r"dropout_p must be a number in \[0, 1\); got 1.0"),
        ((None, None, -0.1), r"dropout_p must be a number in \[0, 1\); got -0.1"),
        ((None, None, 0.1), r"rng must be an int64 tensor .* when dropout_p > 0; got None"),
        ((None, torch.tensor([1.0, 2.0]), 0.1),
         r"rng must be an int64 tensor \(seed, offset\) of shape \(2,\); got torch.float32"),
        ((None, torch.tensor([1, 2, 3]), 0.1),
         r"rng must be .* of shape \(2,\); got torch.int64 of shape \(3,\)"),
        ((None, torch.tensor([1, 2], device="meta"), 0.1),
         r"rng must be on q's device cpu; got meta"),
    ],
)
def test_interp_maskops_raw_forward_checks(extra, match):
    mask, rng, p = extra
    with pytest.raises(ValueError, match=match):
        torch.ops.fastattnreg.triton_attention_fwd(*_raw(), mask, rng, 0.25, "none", p)


def test_interp_maskops_raw_backward_checks():
    q, k, v = _raw()
    mask = torch.ones(17, 17, dtype=torch.bool)
    out, lse, _ = torch.ops.fastattnreg.triton_attention_fwd(q, k, v, mask, None, 0.25, "none",
                                                             0.0)
    bwd = torch.ops.fastattnreg.triton_attention_bwd
    with pytest.raises(ValueError, match=r"mask_grad=True needs a float attn_mask .*torch.bool"):
        bwd(out, q, k, v, out, lse, None, None, mask, None, 0.25, "none", 0.0, True)
    with pytest.raises(ValueError, match=r"rng must be an int64 tensor .*got None"):
        bwd(out, q, k, v, out, lse, None, None, mask, None, 0.25, "none", 0.5, False)
    with pytest.raises(ValueError, match=r"does not broadcast"):
        bwd(out, q, k, v, out, lse, None, None, mask[:3], None, 0.25, "none", 0.0, False)


def test_interp_maskops_public_attention_checks_first():
    q, k, v = _raw()
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\); got 1.5"):
        triton_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"attn_mask must be torch.bool .*got torch.int64"):
        triton_attention(q, k, v, attn_mask=torch.ones(17, 17, dtype=torch.int64))


@pytest.mark.parametrize("name", ["attention_fwd", "attention_bwd"])
def test_interp_maskops_schemas_equal_the_cpp_ops(name):
    triton_op = getattr(torch.ops.fastattnreg, "triton_" + name).default
    assert str(triton_op._schema) == "fastattnreg::triton_" + cpp_schema(name)
    if fastattnreg.cpp_available():
        cpp_op = getattr(torch.ops.fastattnreg, name).default
        assert str(cpp_op._schema) == "fastattnreg::" + cpp_schema(name)


@pytest.mark.parametrize("kind,p,export", [("key_padding", 0.0, "full"),
                                           ("shared_bias", 0.3, "cls"),
                                           ("full_bias", 0.0, "key_mean"),
                                           ("head_bool", 0.5, "none")])
def test_interp_maskops_opcheck(kind, p, export):
    B, H, N, D = 1, 2, 17, 16
    q, k, v = [torch.randn(B, H, N, D, requires_grad=True) for _ in range(3)]
    mask = triton_attention_mask(kind, B, H, N, torch.float32, "cpu")
    rng = torch.tensor([3, 4]) if p > 0 else None
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_fwd.default,
                          (q, k, v, mask, rng, 0.25, export, p))
    qd, kd, vd, md = q.detach(), k.detach(), v.detach(), mask.detach()
    out, lse, maps = torch.ops.fastattnreg.triton_attention_fwd(qd, kd, vd, md, rng, 0.25, export,
                                                                p)
    dmaps = torch.randn_like(maps) if export != "none" else None
    args = (torch.randn_like(out), qd, kd, vd, out, lse, torch.randn_like(lse), dmaps, md, rng,
            0.25, export, p, md.dtype != torch.bool)
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_bwd.default, args)


def test_interp_maskops_compile_fullgraph_with_mask_and_dropout():
    """attention() with a float bias requiring grad and dropout, compiled whole (aot_eager: the
    ops are opaque under the interpreter); the rng is drawn inside the graph, so the same seed
    gives the eager run's numbers."""
    q, k, v = qkv(SMALL, torch.float32)
    bias = triton_attention_mask("shared_bias", 2, 2, 17, torch.float32, "cpu")
    assert_compiled_mask_dropout_matches_eager(triton_attention, q, k, v, bias,
                                               backend="aot_eager")
