"""The autograd rule shared by every attention forward op (C++ and Triton backends).

A forward op `fastattnreg::<fwd>(q, k, v, scale, export) -> (out, lse, maps)` keeps only q, k, v,
out and the LSE; its backward op `<bwd>(dout, q, k, v, out, lse, dlse, dmaps, scale, export)
-> (dq, dk, dv)` recomputes P from the LSE and folds the gradients of the maps and the LSE in.
"""
from __future__ import annotations

import torch


def register_attention_autograd(fwd_name: str, bwd_name: str) -> None:
    """Registers autograd for torch.ops.fastattnreg.<fwd_name> using <bwd_name> as backward."""

    def setup_context(ctx, inputs, output):
        q, k, v, scale, export = inputs
        out, lse, _ = output
        # Only q, k, v, out and the LSE are kept: P is recomputed in the backward, never stored.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.export = export
        # Unused outputs get None, not zeros: a zero (B, H, N, N) map gradient would cost the
        # very memory the kernels avoid, and they skip a None gradient outright.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse, dmaps):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.export == "none":
            dmaps = None
        bwd = getattr(torch.ops.fastattnreg, bwd_name)  # looked up per call: tests may spy on it
        dq, dk, dv = bwd(dout, q, k, v, out, lse, dlse, dmaps, ctx.scale, ctx.export)
        return dq, dk, dv, None, None

    torch.library.register_autograd(f"fastattnreg::{fwd_name}", backward,
                                    setup_context=setup_context)
