"""attention_ref: attention in plain PyTorch with every (B, H, N, N) map materialised, the
reference the fused `attention()` (ops/attention.py) is tested against, with the mask and
fully-masked-row rules both backends follow: a bool mask's False keys get logit -inf, a float
mask is added to the logits, and a row whose every key is masked has probabilities 0 and LSE
-inf (zero gradient).
"""
from __future__ import annotations

import torch

from .checks import accumulation_dtype


def masked_logits(logits: torch.Tensor, attn_mask) -> torch.Tensor:
    """logits (B, H, N, N) with SDPA's mask applied: bool False -> -inf, float -> added."""
    if attn_mask is None:
        return logits
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf"))
    return logits + attn_mask.to(logits.dtype)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row whose every logit is -inf (every key masked) is 0."""
    dead = logits.amax(dim=-1, keepdim=True) == float("-inf")
    return logits.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)


def attention_ref(q, k, v, *, attn_mask=None, dropout_p=0.0, dropout_mask=None, scale=None,
                  export=None, return_lse=False, upcast=True):
    """Plain-PyTorch attention with the same outputs as `attention()`.

    dropout_mask: the bool keep-mask (B, H, N, N) applied with `dropout_p` (kept entries scaled
    by 1 / (1 - dropout_p)); the kernels' own is `ops.dropout.dropout_keep_mask`. Maps are the
    probabilities before dropout. upcast=True computes in float32 (float64 stays float64) and
    casts out and maps back to the input dtype; upcast=False computes in the input dtype (the
    "reference run in that dtype" of the low-precision error rule).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    logits = masked_logits((q @ k.transpose(-2, -1)) * scale, attn_mask)  # (B, H, N, N)
    probs = softmax_rows(logits)
    dropped = probs
    if dropout_mask is not None and dropout_p > 0:
        dropped = probs * dropout_mask.to(probs.dtype) * (1.0 / (1.0 - dropout_p))
    out = (dropped @ v).to(dtype)
    result = [out]
    if export is not None:
        maps = {"full": probs, "head_mean": probs.mean(dim=1), "cls": probs[:, :, 0, :],
                "key_mean": probs.mean(dim=2)}[export]
        result.append(maps.to(dtype))
    if return_lse:
        result.append(logsumexp_rows(logits.to(accumulation_dtype(dtype))))
    return result[0] if len(result) == 1 else tuple(result)


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis; -inf, with a zero gradient, for a fully masked row."""
    dead = logits.amax(dim=-1, keepdim=True) == float("-inf")
    lse = torch.logsumexp(logits.masked_fill(dead, 0.0), dim=-1)
    return lse.masked_fill(dead.squeeze(-1), float("-inf"))
