"""Autocast rules of the fused ops: under torch.autocast they run in the lower precision, as
F.scaled_dot_product_attention does.

Attention ops (attention_fwd, attention_match_fwd and their triton_* twins): an Autocast<device>
kernel casts the op's floating-point tensor arguments (q, k, v, a float attn_mask, the teacher's
q and k) to the autocast dtype of the tensors' device and calls the op with autocast off; the
casts are ordinary autograd ops, so gradients reach the float32 tensors. The dtype is read at
call time (torch.get_autocast_dtype): torch.library.register_autocast takes one fixed dtype per
device, while autocast runs bfloat16 or float16 on either device as its region asks. As in
autocast itself, float64 tensors, integer and bool tensors (the dropout stream's rng, a bool
mask) and tensors on another device are left alone. The backward ops need no rule: autograd
feeds them the forward's (already cast) tensors and gradients of the outputs' dtype.

A kernel without a path for autocast's dtype (the C++ kernels have no float16) runs in
float32 instead, as autocast runs the ops it lists as float32: the rule casts to float32.

refined_attention has no op-level rule: its wrapper (ops/refiner.py) casts q, k, v and the
weights with `cast_for_autocast` and never casts the BatchNorm running statistics, which it
updates in place.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from . import attention as _attention  # noqa: F401  (the ops must be defined before their rules)
from . import match as _match  # noqa: F401

# One IMPL library for every rule registered here; it lives as long as the module.
_lib = torch.library.Library("fastattnreg", "IMPL")

DEVICE_TYPES = ("cpu", "cuda")
# The lower-precision dtypes each kernel family takes (csrc/checks.h, triton/attention.py).
CPP_DTYPES = (torch.bfloat16,)
TRITON_DTYPES = (torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs lower-precision ops in on `device`'s type, or None where it is
    off (or unavailable) for that device type."""
    kind = device.type
    # Autocast always exists for "cpu" and "cuda", the kernels' devices; the availability check
    # is left to other device types, because torch.compile before torch 2.14 cannot trace it
    # (a graph break that fails fullgraph=True).
    if kind not in ("cpu", "cuda") and not torch.amp.is_autocast_available(kind):
        return None
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast_for_autocast(t, device_type: str, dtype: torch.dtype):
    """t cast to `dtype` when autocast would cast it (a float16/bfloat16/float32 tensor on
    `device_type`); anything else unchanged."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def run_dtype(amp_dtype: torch.dtype, supported: tuple) -> torch.dtype:
    """The dtype a kernel taking the lower-precision dtypes `supported` runs in under autocast
    to `amp_dtype`: that dtype if it can, else float32."""
    return amp_dtype if amp_dtype in supported else torch.float32


def register_autocast_rule(name: str, device_type: str, supported: tuple) -> None:
    """Registers the cast-then-run kernel of torch.ops.fastattnreg.<name> for `device_type`;
    `supported`: the lower-precision dtypes its kernels take."""
    op = getattr(torch.ops.fastattnreg, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def run(*args):
        dtype = run_dtype(torch.get_autocast_dtype(device_type), supported)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast_for_autocast(a, device_type, dtype) for a in args))

    def kernel(_keyset, *args, **kwargs):
        if kwargs:
            raise RuntimeError(f"fastattnreg::{name} takes positional arguments only under "
                               f"autocast; got keywords {sorted(kwargs)}")
        return run(*args)

    _lib.impl(name, kernel, key_name, with_keyset=True)
    # The Python dispatcher (torch.compile, torch.export tracing) looks up py_kernels instead.
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)


def _registered(name: str) -> bool:
    return hasattr(torch.ops.fastattnreg, name)


def register_all() -> tuple[str, ...]:
    """Registers the rules of every attention op that exists here; returns their names."""
    rules = []
    if _backend.cpp_available():
        rules += [("attention_fwd", CPP_DTYPES), ("attention_match_fwd", CPP_DTYPES)]
    rules += [(n, TRITON_DTYPES) for n in ("triton_attention_fwd", "triton_attention_match_fwd")
              if _registered(n)]
    for name, supported in rules:
        for device_type in DEVICE_TYPES:
            register_autocast_rule(name, device_type, supported)
    return tuple(name for name, _ in rules)


REGISTERED = register_all()
