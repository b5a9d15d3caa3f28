"""The autograd rule shared by the attention_match forward ops (C++ and Triton backends).

A forward op `fastattnreg::<fwd>(q, k, v, teacher_q, teacher_k, attn_mask, scale, teacher_scale,
kind, rows) -> (out, lse, teacher_row_lse, row_loss, *student_row_lse)` keeps q, k, v, out, the
student's LSE (B, H, N), the teacher's q, k and the matched rows' LSEs (B, H, R): the teacher's,
and on the Triton backend the student's too. Its backward op `<bwd>(dout, dlse, drow_loss, q,
k, v, out, lse, teacher_q, teacher_k, *row_lses, attn_mask, scale, teacher_scale, kind, rows)
-> (dq, dk, dv)` recomputes both models' probabilities from them. The row LSEs are not
differentiable outputs (the teacher's does not depend on the student at all); the teacher and
the mask get no gradient (the mask shapes the teacher's logits too).
"""
from __future__ import annotations

import torch

from .checks import check_match_mask_needs_no_grad


def register_match_autograd(fwd_name: str, bwd_name: str) -> None:
    """Registers autograd for torch.ops.fastattnreg.<fwd_name> using <bwd_name> as backward."""

    def setup_context(ctx, inputs, output):
        q, k, v, teacher_q, teacher_k, attn_mask, scale, teacher_scale, kind, rows = inputs
        check_match_mask_needs_no_grad(attn_mask)
        out, lse, teacher_row_lse, _row_loss, *student_row_lse = output
        row_lses = (teacher_row_lse, *student_row_lse)
        # O(B*H*N) beyond the inputs: out, the student's LSE and the matched rows' LSEs.
        ctx.save_for_backward(q, k, v, out, lse, teacher_q, teacher_k, *row_lses, attn_mask)
        ctx.mark_non_differentiable(*row_lses)
        ctx.args = (scale, teacher_scale, kind, rows)
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse, _dteacher_row_lse, drow_loss, *_dstudent_row_lse):
        *saved, attn_mask = ctx.saved_tensors
        bwd = getattr(torch.ops.fastattnreg, bwd_name)
        dq, dk, dv = bwd(dout, dlse, drow_loss, *saved, attn_mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd(f"fastattnreg::{fwd_name}", backward,
                                    setup_context=setup_context)
