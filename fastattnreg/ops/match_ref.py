"""attention_match_ref: the student's attention and its divergence from a teacher's in plain
PyTorch, with both models' (B, H, N, N) logits materialised: the reference the fused
`attention_match()` (ops/match.py) is tested against. The kinds and the matched rows are
described there.
"""
from __future__ import annotations

import torch

from .attention_ref import masked_logits, softmax_rows
from .checks import accumulation_dtype


def attention_match_ref(q, k, v, teacher_q, teacher_k, *, attn_mask=None, kind="kl", rows="all",
                        scale=None, teacher_scale=None, upcast=True):
    """Plain PyTorch with materialised maps: (out, loss), loss in float32 (float64 for float64).

    attn_mask (as attention()'s) applies to the student's and the teacher's logits alike; the
    keys it masks (logit -inf in both) take no part in any row's divergence, and a matched row
    with every key masked contributes 0 (it still counts in the mean). It gets no gradient.
    upcast=True computes in float32 (float64 stays float64); upcast=False computes both models'
    logits and the attention in the input dtype and only the divergence in float32, as eager
    code under autocast does (the "reference run in that dtype" of the low-precision rule).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    teacher_scale = teacher_q.shape[-1] ** -0.5 if teacher_scale is None else teacher_scale
    acc = accumulation_dtype(q.dtype)
    work = acc if upcast else q.dtype
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach() if attn_mask.dtype == torch.bool else attn_mask.detach().to(work)
    s_logits = masked_logits((q.to(work) @ k.to(work).transpose(-2, -1)) * scale, mask)
    out = (softmax_rows(s_logits) @ v.to(work)).to(q.dtype)
    with torch.no_grad():  # the teacher gets no gradient
        t_logits = masked_logits(
            (teacher_q.to(work) @ teacher_k.to(work).transpose(-2, -1)) * teacher_scale, mask)
    s_logits, t_logits = s_logits.to(acc), t_logits.to(acc)
    if rows == "cls":
        s_logits, t_logits = s_logits[:, :, :1, 1:], t_logits[:, :, :1, 1:]
    live = torch.isfinite(t_logits)  # (B, H, R, n): the keys that take part
    dead = ~live.any(dim=-1)  # (B, H, R): rows whose every key is masked
    if kind == "mse_logits":
        per_row = (s_logits - t_logits).masked_fill(~live, 0.0).square().sum(-1)
    else:
        log_ps = s_logits.masked_fill(dead.unsqueeze(-1), 0.0).log_softmax(-1)
        log_pt = t_logits.masked_fill(dead.unsqueeze(-1), 0.0).log_softmax(-1)
        if kind == "kl":
            per_row = (log_pt.exp() * (log_pt - log_ps)).masked_fill(~live, 0.0).sum(-1)
        else:
            per_row = (log_ps.exp() - log_pt.exp()).square().sum(-1)
    return out, per_row.masked_fill(dead, 0.0).mean()
