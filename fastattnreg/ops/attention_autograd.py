"""The autograd rule shared by every attention forward op (C++ and Triton backends).

A forward op `fastattnreg::<fwd>(q, k, v, attn_mask, rng, scale, export, dropout_p)
-> (out, lse, maps)` keeps only q, k, v, out, the LSE, the mask and the dropout stream's
(seed, offset); its backward op `<bwd>(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng,
scale, export, dropout_p, mask_grad) -> (dq, dk, dv, dmask)` recomputes P from the LSE,
regenerates the dropout mask and folds the gradients of the maps and the LSE in. dmask is the
(B, H, N, N) gradient of an additive float mask (only when it requires grad); it is summed here
to the mask's own broadcast shape.
"""
from __future__ import annotations

import torch


def sum_mask_grad(dmask: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) -> the mask's own shape: summed over every broadcast axis, in float32 at
    least, then cast to the mask's dtype."""
    acc = torch.promote_types(dmask.dtype, torch.float32)
    return dmask.to(acc).sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def register_attention_autograd(fwd_name: str, bwd_name: str) -> None:
    """Registers autograd for torch.ops.fastattnreg.<fwd_name> using <bwd_name> as backward."""

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, rng, scale, export, dropout_p = inputs
        out, lse, _ = output
        # Only q, k, v, out and the LSE are kept: P is recomputed in the backward, never stored.
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng)
        ctx.args = (scale, export, dropout_p)
        # Unused outputs get None, not zeros: a zero (B, H, N, N) map gradient would cost the
        # very memory the kernels avoid, and they skip a None gradient outright.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse, dmaps):
        q, k, v, out, lse, attn_mask, rng = ctx.saved_tensors
        scale, export, dropout_p = ctx.args
        if export == "none":
            dmaps = None
        mask_grad = bool(ctx.needs_input_grad[3])
        bwd = getattr(torch.ops.fastattnreg, bwd_name)  # looked up per call: tests may spy on it
        dq, dk, dv, dmask = bwd(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale,
                                export, dropout_p, mask_grad)
        dmask = sum_mask_grad(dmask, attn_mask) if mask_grad else None
        return dq, dk, dv, dmask, None, None, None, None

    torch.library.register_autograd(f"fastattnreg::{fwd_name}", backward,
                                    setup_context=setup_context)
