"""TorchScript paths of the ops: the C++ kernels called straight through torch.ops.fastattnreg.

attention(), attention_match() and refined_attention() check their arguments and pick a
backend in Python that TorchScript cannot compile. The functions here do the same work with
only what TorchScript compiles; the nn modules call them when torch.jit.is_scripting(). They
run the C++ CPU kernels (backend "auto" or "cpp" on CPU tensors) and leave the argument checks
to the kernels, which check every shape, dtype and value before they write anything. The
FASTATTNREG_BACKEND variable is not read here. A scripted model that uses them saves with
torch.jit.save and runs after torch.jit.load wherever fastattnreg is imported: the import
registers the ops, their autograd and their autocast rules.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .checks import accumulation_dtype

def require_cpp(backend: str, q: Tensor, what: str) -> None:
    """Raises unless the C++ kernels can run `what` for `backend` and q's device."""
    if backend != "auto" and backend != "cpp":
        raise RuntimeError(
            what + " under TorchScript runs the C++ kernels only (backend 'auto' or 'cpp'); got "
            "backend '" + backend + "'")
    if q.device.type != "cpu":
        raise RuntimeError(
            what + " under TorchScript runs the C++ kernels on CPU tensors only; got q on "
            + str(q.device))


def attention_script(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                     dropout_p: float, scale: float, export: Optional[str],
                     backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """attention(q, k, v, attn_mask=..., dropout_p=..., scale=..., export=...): (out, maps),
    maps None when export is None. q, k, v (B, H, N, D)."""
    require_cpp(backend, q, "attention")
    rng: Optional[Tensor] = None
    if dropout_p > 0.0:
        # The dropout stream's (seed, offset), drawn as ops/dropout.draw_rng draws it (bound
        # 2 ** 62, written out: TorchScript reads no global ints), so that a scripted and an
        # eager model draw alike under one seed.
        rng = torch.randint(0, 4611686018427387904, [2], dtype=torch.int64, device=q.device)
    export_name = "none" if export is None else export
    out, _, maps = torch.ops.fastattnreg.attention_fwd(q, k, v, attn_mask, rng, scale,
                                                       export_name, dropout_p)
    if export is None:
        return out, None
    return out, maps


def attention_match_script(q: Tensor, k: Tensor, v: Tensor, teacher_q: Tensor,
                           teacher_k: Tensor, attn_mask: Optional[Tensor], kind: str, rows: str,
                           scale: float, teacher_scale: Optional[float],
                           backend: str) -> Tuple[Tensor, Tensor]:
    """attention_match(...): (out (B, H, N, D), the mean per-row divergence, a scalar)."""
    require_cpp(backend, q, "attention_match")
    t_scale = float(teacher_q.shape[-1]) ** -0.5 if teacher_scale is None else teacher_scale
    out, _, _, row_loss = torch.ops.fastattnreg.attention_match_fwd(
        q, k, v, teacher_q.detach(), teacher_k.detach(), attn_mask, scale, t_scale, kind, rows)
    return out, row_loss.mean()


def update_running_stats(running_mean: List[Tensor], running_var: List[Tensor], mean: Tensor,
                         var: Tensor, momentum: List[float], count: int) -> None:
    """running <- (1 - momentum) running + momentum batch, per BatchNorm, with the unbiased
    batch variance. mean, var: the packed (2C + 2H) batch statistics the kernel used; each
    running tensor keeps its own dtype."""
    with torch.no_grad():
        unbiased = var * (float(count) / float(count - 1))
        start = 0
        for i in range(len(running_mean)):
            rm, rv, m = running_mean[i], running_var[i], momentum[i]
            size = rm.shape[0]
            rm.mul_(1.0 - m).add_(mean[start:start + size].to(rm.dtype), alpha=m)
            rv.mul_(1.0 - m).add_(unbiased[start:start + size].to(rv.dtype), alpha=m)
            start += size


def refined_attention_script(q: Tensor, k: Tensor, v: Tensor, conv_exp_weight: Tensor,
                             conv_dw_weight: Tensor, conv_pro_weight: Tensor,
                             bn_weight: List[Tensor], bn_bias: List[Tensor],
                             running_mean: List[Tensor], running_var: List[Tensor],
                             momentum: List[float], eps: List[float], training: bool,
                             scale: float, attn_drop: float, export: Optional[str],
                             backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """refined_attention(...) with one momentum and eps per BatchNorm (bn1, bn2, bn3, adapt_bn);
    (out (B, H, N, D), maps by `export` or None). The weights are cast to q's dtype (autocast's
    lower precision), the running statistics are read through a packed copy in the accumulation
    type and updated in their own dtype. The kernels check every value; momentum is checked
    here, before anything is written."""
    require_cpp(backend, q, "refined_attention")
    B, H, N, D = q.shape
    C = conv_exp_weight.shape[0]
    K = conv_dw_weight.shape[-1]
    dtype = q.dtype
    dropout = training and attn_drop > 0.0
    keep: Optional[Tensor] = None
    if dropout:
        keep = torch.empty([B, H, N, N], dtype=torch.bool, device=q.device)
        keep.bernoulli_(1.0 - attn_drop)
    weights = [conv_exp_weight, conv_dw_weight, conv_pro_weight] + bn_weight + bn_bias
    requires_grad = q.requires_grad or k.requires_grad or v.requires_grad
    for w in weights:
        requires_grad = requires_grad or w.requires_grad
    save_probs = (not training) and torch.is_grad_enabled() and requires_grad
    for m in momentum:
        if not 0.0 <= m <= 1.0:
            raise ValueError("momentum must be a number in [0, 1]; got " + str(m))
    # Read by the kernels in the accumulation type (float32 for bfloat16 q), never rounded to q's.
    acc = accumulation_dtype(dtype)
    with torch.no_grad():
        packed_mean = torch.cat([t.to(acc) for t in running_mean])
        packed_var = torch.cat([t.to(acc) for t in running_var])
    export_name = "none" if export is None else export
    out, _, _, mean, var, maps = torch.ops.fastattnreg.refined_attention_fwd(
        q, k, v, conv_exp_weight.to(dtype).reshape(C, H), conv_dw_weight.to(dtype).reshape(C, K, K),
        conv_pro_weight.to(dtype).reshape(H, C), torch.cat([t.to(dtype) for t in bn_weight]),
        torch.cat([t.to(dtype) for t in bn_bias]), packed_mean, packed_var, keep, eps, scale,
        1.0 / (1.0 - attn_drop) if dropout else 1.0, training, save_probs, export_name)
    if training:
        update_running_stats(running_mean, running_var, mean, var, momentum, B * N * N)
    if export is None:
        return out, None
    return out, maps
