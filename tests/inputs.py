"""Input builders shared by the test files and the interpreter case files.

  qkv(shape, dtype)            three (B, H, N, D) tensors drawn with torch.randn in `dtype`
  qkv_on(shape, dtype, device) three tensors drawn in float64 on the CPU, then cast and moved,
                               so every dtype and device sees the same numbers
  SEQ_LENS x HEAD_DIMS, grid_shape(n, d)
                               the (N, D) grid every attention backend is tested on, with the
                               batch and head count cycling along it
"""
import torch

EXPORTS = (None, "full", "head_mean", "cls", "key_mean")

SEQ_LENS = (1, 17, 65, 197, 257)  # CLS + 0, 4x4, 8x8, 14x14, 16x16 patch grids
HEAD_DIMS = (16, 48, 64, 80)
BATCH_HEADS = ((1, 1), (2, 3), (3, 2), (1, 4))


def grid_shape(n: int, d: int) -> tuple[int, int, int, int]:
    """(B, H, n, d) for a point of the SEQ_LENS x HEAD_DIMS grid: B x H cycles through
    BATCH_HEADS, so every (N, D) pair also varies the batch and head count, the same on every
    backend."""
    b, h = BATCH_HEADS[(SEQ_LENS.index(n) + HEAD_DIMS.index(d)) % len(BATCH_HEADS)]
    return b, h, n, d


def qkv(shape, dtype=torch.float64, requires_grad=True) -> list[torch.Tensor]:
    """q, k, v of `shape`, each torch.randn(shape, dtype=dtype) from the global generator."""
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def qkv_on(shape, dtype, device, requires_grad=True) -> list[torch.Tensor]:
    """q, k, v of `shape`, drawn in float64 on the CPU and then cast to `dtype` on `device`."""
    return [torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_(requires_grad) for _ in range(3)]
