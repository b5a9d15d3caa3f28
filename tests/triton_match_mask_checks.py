"""attention_match(attn_mask=...) on the Triton backend against attention_match_ref in float64:
the checks shared by the interpreter cases (tests/triton_match_mask_cases.py, CPU tensors) and
the CUDA group of tests/test_triton_match.py, on the masks of inputs.match_mask.
"""
from __future__ import annotations

import torch

from fastattnreg import attention_match, attention_match_ref
from inputs import match_inputs, match_mask


def dead_rows(mask: torch.Tensor, B: int, H: int, N: int, rows: str) -> torch.Tensor:
    """(B, H, R) bool: the matched rows whose every matched key is masked (for rows="cls" query
    0 over keys 1..N-1)."""
    m = mask.detach().cpu()
    live = m if m.dtype == torch.bool else m != float("-inf")
    live = live.expand(B, H, N, N)
    if rows == "cls":
        live = live[:, :, :1, 1:]
    return ~live.any(-1)


def errors_against_reference(shape, mask_kind: str, kind: str, rows: str, device,
                             seed: int = 0) -> dict:
    """{name: (error, size)} of out, loss, dq, dk, dv of attention_match(backend="triton") in
    float32 on `device` against attention_match_ref in float64 (upstream gradients on out and
    the loss both); `size` is the reference's largest magnitude (errors scale with it)."""
    B, H, N, _, _ = shape
    q, k, v, tq, tk = match_inputs(shape, rng=seed)
    mask = match_mask(mask_kind, B, H, N, torch.float32, "cpu", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dout, dloss = torch.randn(q.shape, dtype=torch.float64, generator=gen), torch.tensor(1.3)

    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_loss = attention_match_ref(q64, k64, v64, tq, tk, attn_mask=mask, kind=kind,
                                            rows=rows)
    ref = [ref_out, ref_loss, *torch.autograd.grad((ref_out, ref_loss), (q64, k64, v64),
                                                   (dout, dloss.double()))]

    qd, kd, vd = (t.to(device, torch.float32).requires_grad_() for t in (q, k, v))
    out, loss = attention_match(qd, kd, vd, tq.to(device, torch.float32),
                                tk.to(device, torch.float32), attn_mask=mask.to(device),
                                kind=kind, rows=rows, backend="triton")
    got = [out, loss, *torch.autograd.grad((out, loss), (qd, kd, vd),
                                           (dout.to(device, torch.float32), dloss.to(device)))]
    result = {}
    for name, a, b in zip(("out", "loss", "dq", "dk", "dv"), got, ref):
        a = a.detach().cpu().double()
        assert torch.isfinite(a).all(), f"{name} is not finite"
        result[name] = ((a - b).abs().max().item(), b.abs().max().item())
    return result
