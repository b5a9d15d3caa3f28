"""Calling refined_attention (or its reference, or a raw op) on the inputs of
inputs.refiner_inputs, for the Refiner's test files on every backend.

qkv: [q, k, v] (B, H, N, D); params: the 11 tensors REFINER_PARAM_NAMES lists (the three conv
weights, then the four BatchNorms' weights and biases); running: (means, variances), four each.
"""
import torch

from inputs import refiner_inputs


def call(fn, qkv, params, running, **kw):
    """fn(q, k, v, convs..., bn weights, bn biases, running means, running vars, **kw)."""
    return fn(*qkv, *params[:3], params[3:7], params[7:11], running[0], running[1], **kw)


def clone_running(running):
    """A copy of the running statistics, which a training call updates in place."""
    return [t.clone() for t in running[0]], [t.clone() for t in running[1]]


def run_with_grads(fn, qkv, params, running, dout, **kw):
    """(out, the gradients of <out, dout> for q, k, v and every param)."""
    out = call(fn, qkv, params, running, **kw)
    grads = torch.autograd.grad(out, (*qkv, *params), dout)
    return out, grads


def raw_args(training, save_probs, dropout):
    """The arguments of fastattnreg::refined_attention_fwd for a small float64 case (B = 2,
    H = 2, N = 9, D = 4, expansion 2, kernel 3), the weights in the op's packed layout."""
    qkv, params, running = refiner_inputs(2, 2, 9, 4, 2, 3)
    C, H = 4, 2
    keep = torch.rand(2, 2, 9, 9) > 0.3 if dropout else None
    return (*qkv, params[0].detach().reshape(C, H).requires_grad_(),
            params[1].detach().reshape(C, 3, 3).requires_grad_(),
            params[2].detach().reshape(H, C).requires_grad_(),
            torch.cat(params[3:7]).detach().requires_grad_(),
            torch.cat(params[7:11]).detach().requires_grad_(), torch.cat(running[0]),
            torch.cat(running[1]), keep, [1e-5, 1e-5, 1e-3, 1e-5], 0.4,
            1 / 0.7 if dropout else 1.0, training, save_probs, "none")
