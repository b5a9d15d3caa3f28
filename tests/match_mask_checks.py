"""attention_match(attn_mask=...) on the Triton backend against attention_match_ref in float64:
the masks and the comparison shared by the interpreter cases (tests/triton_match_mask_cases.py,
CPU tensors) and the CUDA group of tests/test_triton_match.py.
"""
from __future__ import annotations

import torch

from fastattnreg import attention_match, attention_match_ref

MASK_KINDS = ("key_padding", "per_head_bool", "shared_bias")


def make_match_mask(kind: str, B: int, H: int, N: int, dtype=torch.float32, device="cpu",
                    seed: int = 0) -> torch.Tensor:
    """A mask of one of MASK_KINDS, drawn on the CPU (every device sees the same values):

    key_padding (B, 1, 1, N) bool: batch 0 keeps only keys 0 and 1 (its CLS row has one patch
    key left), batch 1 (when B > 1) its first half. per_head_bool (1, H, N, N) bool: about 40%
    False, the diagonal True; row N-1 of head 0 fully masked, and the CLS row of head H-1 keeps
    no patch key (key 0 only). shared_bias (N, N) of `dtype`: N(0, 1) values, about 20% -inf
    off the diagonal, and row N // 2 all -inf."""
    g = torch.Generator().manual_seed(4321 + 17 * seed + MASK_KINDS.index(kind))
    if kind == "key_padding":
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., 2:] = False
        if B > 1:
            mask[1, ..., N // 2:] = False
    elif kind == "per_head_bool":
        mask = torch.rand(1, H, N, N, generator=g) > 0.4
        mask[..., torch.arange(N), torch.arange(N)] = True
        mask[0, 0, N - 1, :] = False
        mask[0, H - 1, 0, 1:] = False
    elif kind == "shared_bias":
        mask = torch.randn(N, N, generator=g, dtype=torch.float64)
        mask[torch.rand(N, N, generator=g) < 0.2] = float("-inf")
        mask[torch.arange(N), torch.arange(N)] = 0.0
        mask[N // 2, :] = float("-inf")
        mask = mask.to(dtype)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


def dead_rows(mask: torch.Tensor, B: int, H: int, N: int, rows: str) -> torch.Tensor:
    """(B, H, R) bool: the matched rows whose every matched key is masked (for rows="cls" query
    0 over keys 1..N-1)."""
    m = mask.detach().cpu()
    live = m if m.dtype == torch.bool else m != float("-inf")
    live = live.expand(B, H, N, N)
    if rows == "cls":
        live = live[:, :, :1, 1:]
    return ~live.any(-1)


def case(shape, seed=0):
    """q, k, v (B, H, N, D), tq, tk (B, H, N, Dt), float64 on the CPU."""
    B, H, N, D, Dt = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, generator=gen) for _ in range(3))
    tq, tk = (torch.randn(B, H, N, Dt, dtype=torch.float64, generator=gen) for _ in range(2))
    return q, k, v, tq, tk


def errors_against_reference(shape, mask_kind: str, kind: str, rows: str, device,
                             seed: int = 0) -> dict:
    """{name: (error, size)} of out, loss, dq, dk, dv of attention_match(backend="triton") in
    float32 on `device` against attention_match_ref in float64 (upstream gradients on out and
    the loss both); `size` is the reference's largest magnitude (errors scale with it)."""
    B, H, N, _, _ = shape
    q, k, v, tq, tk = case(shape, seed)
    mask = make_match_mask(mask_kind, B, H, N, torch.float32, "cpu", seed)
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
