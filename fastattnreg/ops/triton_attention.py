"""The Triton attention kernels as torch ops: fastattnreg::triton_attention_fwd / _bwd.

Same schemas and outputs as the C++ ops attention_fwd / attention_bwd (csrc/registration.cpp),
under their own names: the C++ library owns its op names through TORCH_LIBRARY, these are added
to the same namespace as a fragment, whether fastattnreg._C is loaded or not.

  * On CUDA the ops are `torch.library.triton_op`s: the implementation only allocates and
    launches kernels through `wrap_triton`, so it doubles as the fake kernel and torch.compile
    sees (and may fuse around) the kernels themselves. The dropout stream's (seed, offset) stays
    a device tensor that the kernels load: no host read, no graph break.
  * Under TRITON_INTERPRET=1 (CPU tensors, the test suite) they are opaque
    `torch.library.custom_op`s with the fake kernels below: the launchers then call the
    interpreted kernels directly (triton/tiles.py's `traceable`), and those cannot run on fake
    tensors, so torch.compile must not trace in.

The autograd rule is the shared one of ops/attention_autograd.py: only q, k, v, out, the float32
LSE, the mask and the dropout rng are saved; P and the keep-mask are recomputed in the backward.
Imported only when Triton is installed (see fastattnreg.backend).
"""
from __future__ import annotations

import torch

from ..exports import maps_shape
from ..triton.attention import attention_bwd as _launch_bwd
from ..triton.attention import attention_fwd as _launch_fwd
from ..triton.dropout import Dropout
from .attention_autograd import register_attention_autograd
from .checks import ATTENTION_EXPORTS, check_attn_mask, check_dropout_p, op_exports
from .dropout import dropout_threshold
from .triton_ops import (check_saved_attention, check_tensor, check_triton_inputs,
                         contiguous_or_none, define_triton_op, unit_stride)

FWD_NAME = "fastattnreg::triton_attention_fwd"
BWD_NAME = "fastattnreg::triton_attention_bwd"
# The C++ ops' schemas (csrc/registration.cpp), argument and output names included. Stated here
# too because the Triton ops register from Python whether or not the C++ extension is built (a
# wheel ships no .cpp to read them from); tests/triton_attention_mask_cases.py checks that the
# texts agree, for every op.
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? rng, float scale, str export, "
    "float dropout_p) -> (Tensor out, Tensor lse, Tensor maps)"
)
BWD_SCHEMA = (
    "(Tensor? dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
    "Tensor? dmaps, Tensor? attn_mask, Tensor? rng, float scale, str export, float dropout_p, "
    "bool mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)"
)
OP_EXPORTS = op_exports(ATTENTION_EXPORTS)  # the raw ops' export strings


# ------------------------------------------------------------------------------------ checks
# The raw ops skip attention()'s checks; these hold for direct torch.ops calls too.


def _check_extras(q, attn_mask, rng, dropout_p) -> None:
    """The mask (ops.checks.check_attn_mask), dropout_p in [0, 1) and, when dropout_p > 0, the
    stream's rng: int64 (seed, offset) of shape (2,) on q's device."""
    check_attn_mask(attn_mask, q)
    check_dropout_p(dropout_p)
    if rng is None:
        if dropout_p > 0:
            raise ValueError(
                f"rng must be an int64 tensor (seed, offset) of shape (2,) on q's device when "
                f"dropout_p > 0; got None with dropout_p={dropout_p}"
            )
        return
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise ValueError(
            f"rng must be an int64 tensor (seed, offset) of shape (2,); got {rng.dtype} of shape "
            f"{tuple(rng.shape)}"
        )
    if rng.device != q.device:
        raise ValueError(f"rng must be on q's device {q.device}; got {rng.device}")


def _check_fwd(q, k, v, attn_mask, rng, scale, export, dropout_p) -> None:
    check_triton_inputs(q, k, v, scale, export, OP_EXPORTS)
    _check_extras(q, attn_mask, rng, dropout_p)


def _check_bwd(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export, dropout_p,
               mask_grad) -> None:
    _check_fwd(q, k, v, attn_mask, rng, scale, export, dropout_p)
    B, H, N, _ = q.shape
    check_saved_attention(q, out, lse, dout, dlse)
    if dmaps is not None:
        if export == "none":
            raise ValueError("dmaps was given but export is 'none'")
        check_tensor(dmaps, "dmaps", maps_shape(export, B, H, N), q.dtype, q.device)
    if mask_grad and attn_mask is not None and attn_mask.dtype == torch.bool:
        raise ValueError("mask_grad=True needs a float attn_mask (an additive bias); got a "
                         "torch.bool mask, which has no gradient")


def _dmask_like(q, attn_mask, mask_grad):
    """Shape and dtype of the backward's dmask: (B, H, N, N) in the mask's dtype when mask_grad
    (and a mask is given), else an empty (0,)."""
    B, H, N, _ = q.shape
    shape = (B, H, N, N) if mask_grad and attn_mask is not None else (0,)
    return shape, q.dtype if attn_mask is None else attn_mask.dtype


def _dropout(rng, dropout_p):
    # dropout_p == 0 runs the kernels without the stream at all (bitwise the no-dropout run).
    if dropout_p == 0:
        return None
    return Dropout(rng, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p))


# ------------------------------------------------------------------------- implementations


def _fwd_impl(q, k, v, attn_mask, rng, scale, export, dropout_p):
    _check_fwd(q, k, v, attn_mask, rng, scale, export, dropout_p)
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    # The mask is read through its own strides, broadcast axes included: never copied.
    return _launch_fwd(q, k, v, scale, export, attn_mask, _dropout(rng, dropout_p))


def _bwd_impl(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export,
                          dropout_p, mask_grad):
    _check_bwd(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export, dropout_p,
               mask_grad)
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    # Gradients can arrive as expanded or strided views; the kernels read them contiguous.
    dout, out, lse = contiguous_or_none(dout), out.contiguous(), lse.contiguous()
    dlse, dmaps = contiguous_or_none(dlse), contiguous_or_none(dmaps)
    return _launch_bwd(dout, q, k, v, out, lse, dlse, dmaps, scale, export, attn_mask,
                       _dropout(rng, dropout_p), mask_grad)


def _fwd_fake(q, k, v, attn_mask, rng, scale, export, dropout_p):
    _check_fwd(q, k, v, attn_mask, rng, scale, export, dropout_p)
    B, H, N, D = q.shape
    out = q.new_empty((B, H, N, D))
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    return out, lse, q.new_empty(maps_shape(export, B, H, N))


def _bwd_fake(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export, dropout_p,
              mask_grad):
    _check_bwd(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export, dropout_p,
               mask_grad)
    shape, dtype = _dmask_like(q, attn_mask, mask_grad)
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(shape, dtype=dtype))


triton_attention_fwd = define_triton_op(FWD_NAME, _fwd_impl, FWD_SCHEMA, _fwd_fake)
triton_attention_bwd = define_triton_op(BWD_NAME, _bwd_impl, BWD_SCHEMA, _bwd_fake)


# ---------------------------------------------------------------------------------- autograd


register_attention_autograd(FWD_NAME.split("::")[1], BWD_NAME.split("::")[1])
