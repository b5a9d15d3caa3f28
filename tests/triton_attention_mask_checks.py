"""Masks and attention dropout in the Triton attention ops against attention_ref, shared by the
interpreter cases (tests/triton_attention_mask_cases.py, CPU tensors) and the CUDA group of
test_triton_attention.py, on the masks of inputs.triton_attention_mask.

The ops are called directly (torch.ops.fastattnreg.triton_attention_fwd, with its autograd), so
each check picks the dropout stream's rng (seed, offset) itself and hands the reference the
keep-mask ops.dropout.dropout_keep_mask draws from it.
"""
from __future__ import annotations

import contextlib

import torch

from fastattnreg import attention_ref
from fastattnreg.ops.dropout import dropout_keep_mask
from inputs import qkv_on, triton_attention_mask


def full_keep_view(mask, shape):
    """The bool "takes part" pattern of a mask broadcast to (B, H, N, N) (True for float masks
    except at -inf)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    m = mask.detach().cpu()
    m = m if m.dtype == torch.bool else m != float("-inf")
    return m.expand(shape)


def assert_compiled_mask_dropout_matches_eager(attention_fn, q, k, v, bias, *,
                                               compile_context=contextlib.nullcontext,
                                               **compile_kwargs):
    """torch.compile(fullgraph=True) of a loss on attention_fn(q, k, v, attn_mask=bias,
    dropout_p=0.2, export="key_mean", return_lse=True): the dropout stream is drawn inside the
    graph, so under one seed the compiled loss and its gradients (q, k, v and the bias) equal
    the eager run's. compile_context wraps the compiled call (e.g. an inductor setting)."""
    torch._dynamo.reset()

    def loss_fn(q, k, v, bias):
        out, maps, lse = attention_fn(q, k, v, attn_mask=bias, dropout_p=0.2, export="key_mean",
                                      return_lse=True)
        return (out ** 2).sum() + (maps ** 2).sum() + (lse ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, **compile_kwargs)
    torch.manual_seed(3)
    with compile_context():
        loss = compiled(q, k, v, bias)
        grads = torch.autograd.grad(loss, (q, k, v, bias))
    torch.manual_seed(3)
    eager = loss_fn(q, k, v, bias)
    eager_grads = torch.autograd.grad(eager, (q, k, v, bias))
    assert abs(loss.item() - eager.item()) <= 1e-5 * max(1.0, abs(eager.item()))
    for g, e in zip(grads, eager_grads):
        assert inf_aware_err(g, e) <= 1e-5 * max(1.0, e.abs().max().item())


def inf_aware_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference in float64, equal entries (equal infinities too) counting 0;
    NaN anywhere gives NaN."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not a.numel():
        return 0.0
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return diff.max().item()


def triton_op_run(q, k, v, mask, rng, p, export, scale=0.25):
    """(out, lse, maps) of the raw Triton forward op; export None -> "none" (maps empty)."""
    return torch.ops.fastattnreg.triton_attention_fwd(
        q, k, v, mask, rng, scale, "none" if export is None else export, p)


def _leaves(q, k, v, mask):
    leaves = [q, k, v]
    if mask is not None and mask.requires_grad:
        leaves.append(mask)
    return leaves


def _outputs_and_grads(outs, leaves, upstream):
    """{name: tensor} of the outputs (out, lse, maps when exported) and their gradients
    dq, dk, dv (dmask for a float mask) from `upstream` (one per output)."""
    names = ["out", "lse", "maps"][:len(outs)]
    grads = torch.autograd.grad(outs, leaves, [u.to(device=o.device, dtype=o.dtype)
                                               for u, o in zip(upstream, outs)])
    return dict(zip(names + ["dq", "dk", "dv", "dmask"], list(outs) + list(grads)))


def _reference(q, k, v, mask, keep, p, export, upcast):
    """attention_ref on copies of q, k, v and the mask: in float64 (upcast None) or, upcast
    False, in the inputs' own dtype (the FlashAttention error rule's "reference in dtype")."""
    dtype = torch.float64 if upcast is None else q.dtype
    q_, k_, v_ = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    m_ = None
    if mask is not None:
        m_ = mask.detach().cpu()
        if m_.dtype != torch.bool:
            m_ = m_.to(dtype).requires_grad_(mask.requires_grad)
    ref = attention_ref(q_, k_, v_, attn_mask=m_, dropout_p=p, dropout_mask=keep, scale=0.25,
                        export=export, return_lse=True, upcast=bool(upcast))
    outs = [ref[0], ref[-1]] + ([ref[1]] if export is not None else [])
    return outs, _leaves(q_, k_, v_, m_)


def mask_dropout_results(shape, kind, export, p, device, dtype=torch.float32, seed=0,
                         rng=(1234567, 89), in_dtype=False):
    """(triton, reference64, reference_in_dtype or None): {name: tensor} of out, lse, maps and
    dq, dk, dv (dmask for a float mask) of the Triton ops and of attention_ref with the same
    mask and keep-mask, under the same random upstream gradients."""
    torch.manual_seed(seed)
    B, H, N, D = shape
    q, k, v = qkv_on(shape, dtype, device)
    mask = None if kind is None else triton_attention_mask(kind, B, H, N, dtype, device)
    rng_t = torch.tensor(rng, dtype=torch.int64, device=device) if p > 0 else None
    keep = dropout_keep_mask((B, H, N, N), p, rng_t.cpu()) if p > 0 else None
    ref_outs, ref_leaves = _reference(q, k, v, mask, keep, p, export, None)
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in ref_outs]
    want = _outputs_and_grads(ref_outs, ref_leaves, upstream)
    out, lse, maps = triton_op_run(q, k, v, mask, rng_t, p, export)
    outs = [out, lse] + ([maps] if export is not None else [])
    got = _outputs_and_grads(outs, _leaves(q, k, v, mask), upstream)
    pt = None
    if in_dtype:
        pt = _outputs_and_grads(*_reference(q, k, v, mask, keep, p, export, False), upstream)
    return got, want, pt


def compare_with_reference(shape, kind, export, p, device, dtype=torch.float32, **kwargs):
    """{name: max error} of the Triton outputs and gradients against attention_ref in float64.

    Also checks shapes and dtypes (lse float32, the rest in the input dtype), and that neither
    side has a NaN (the reference stays finite on fully masked rows, so the comparison means
    something there too)."""
    got, want, _ = mask_dropout_results(shape, kind, export, p, device, dtype, **kwargs)
    assert list(got) == list(want), (list(got), list(want))
    errors = {}
    for name in got:
        a, b = got[name], want[name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == (torch.float32 if name == "lse" else dtype), (name, a.dtype)
        assert not a.isnan().any(), f"{name} has NaN"
        assert not b.isnan().any(), f"reference {name} has NaN"
        errors[name] = inf_aware_err(a, b)
    return errors


def low_precision_mask_errors(shape, kind, export, p, device, dtype):
    """{name: (Triton error, error of attention_ref run in dtype)} against float64 math, for
    the FlashAttention rule (the first at most twice the second)."""
    got, want, pt = mask_dropout_results(shape, kind, export, p, device, dtype, in_dtype=True)
    return {name: (inf_aware_err(got[name], want[name]), inf_aware_err(pt[name], want[name]))
            for name in got}
