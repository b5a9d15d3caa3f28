"""The autograd rule shared by every refined-attention forward op (C++ and Triton).

A forward op `fastattnreg::<fwd>(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean,
running_var, keep, eps, scale, drop_scale, training, save_probs, export) -> (out, probs, y, mean,
var, maps)` keeps q, k, v, the weights, P (probs), Y (y, where the kernel keeps it; else empty)
and the statistics it used; its backward op `<bwd>(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight,
bn_bias, probs, y, mean, var, keep, eps, scale, drop_scale, training, dmaps, export) -> (dq, dk,
dv, dw_exp, dw_dw, dw_pro, dbn_weight, dbn_bias)` recomputes the rest of the refinement chain
from P and adds dmaps, the gradient of the exported maps of A*, into dA* = dout V^T.
probs, y, mean and var are outputs for the backward and the running-statistics update only:
they carry no gradient; maps does.
"""
from __future__ import annotations

import torch


def register_refiner_autograd(fwd_name: str, bwd_name: str) -> None:
    """Registers autograd for torch.ops.fastattnreg.<fwd_name> using <bwd_name> as backward."""

    def setup_context(ctx, inputs, output):
        (q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, _, _, keep, eps, scale, drop_scale,
         training, _, export) = inputs
        _, probs, y, mean, var, _ = output
        ctx.save_for_backward(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, y, mean,
                              var, keep)
        ctx.args = (eps, scale, drop_scale, training)
        ctx.export = export
        ctx.mark_non_differentiable(probs, y, mean, var)
        # Unused outputs get None, not zeros: without this autograd fills (B, H, N, N) tensors of
        # zeros for probs, y (and maps, when only out is used) on every backward.
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, _dprobs, _dy, _dmean, _dvar, dmaps):
        if ctx.export == "none":
            dmaps = None  # the (0,) placeholder output carries nothing
        if dout is None and dmaps is None:  # neither out nor the maps took part
            return (None,) * 17
        if dout is None:  # only the maps were used: out's gradient is zero, (B, H, N, D)
            dout = torch.zeros_like(ctx.saved_tensors[0],
                                    memory_format=torch.contiguous_format)
        bwd = getattr(torch.ops.fastattnreg, bwd_name)  # looked up per call: tests may spy on it
        grads = bwd(dout, *ctx.saved_tensors, *ctx.args, dmaps, ctx.export)
        return (*grads, None, None, None, None, None, None, None, None, None)

    torch.library.register_autograd(f"fastattnreg::{fwd_name}", backward,
                                    setup_context=setup_context)
