"""The Triton autotuner's tile choice per regime, dtype and head dim (fastattnreg/triton/tiles.py).

The tile lists hold only tiles that compile without register spills (tests/test_triton_aot.py
proves that with ptxas); these tests check the pruning that picks from them: a launch gets the
list of its regime and padded head dim (the larger of the student's and the teacher's), and a
launch with no list there is refused with the head dim, the dtype and the limit named.
"""
from types import SimpleNamespace

import pytest
import torch

import fastattnreg

pytestmark = pytest.mark.skipif(
    not fastattnreg.backend.triton_installed() or fastattnreg.backend._triton_interpret,
    reason="needs Triton (not the interpreter, which runs one tile)")

if fastattnreg.backend.triton_installed():
    from fastattnreg.triton import tiles as T

ALL_TILES = ("FWD_TILES", "MAPS_TILES", "KEY_MEAN_TILES", "DELTA_TILES", "MATCH_TILES",
             "DKDV_TILES", "DQ_TILES")
HEAVY = dict(MASK=2, DROPOUT=True)


def _prune(tiles, dtype, head_dim, teacher_dim=None, n=4096, **flags):
    configs = T.configs(tiles)
    if teacher_dim is not None:
        flags["TEACHER_DIM"] = teacher_dim
    kept = T.pruner(tiles)(configs, {"N": n, "Q": SimpleNamespace(dtype=dtype)},
                           HEAD_DIM=head_dim, **flags)
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}


@pytest.mark.parametrize("name", ALL_TILES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flags", [{}, HEAVY], ids=["plain", "heavy"])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 48, 64, 80, 96, 128])
def test_16bit_inputs_get_the_list_of_their_regime_and_padded_head_dim(name, dtype, flags,
                                                                       head_dim):
    tiles = getattr(T, name)
    kind = T.regime(dtype, flags)
    want = set(tiles.for_dim(kind, T.padded_dim(head_dim)))
    assert want, (name, kind, head_dim)  # every 16-bit launch of D in [16, 128] has tiles
    assert _prune(tiles, dtype, head_dim, **flags) == want


def test_the_larger_head_dim_of_student_and_teacher_picks_the_list():
    small = set(T.DKDV_TILES.for_dim("plain", 64))
    large = set(T.DKDV_TILES.for_dim("plain", 128))
    assert small != large
    assert _prune(T.DKDV_TILES, torch.float16, 64, teacher_dim=64) == small
    assert _prune(T.DKDV_TILES, torch.float16, 64, teacher_dim=80) == large
    assert _prune(T.DKDV_TILES, torch.float16, 128, teacher_dim=32) == large


def test_short_sequences_drop_the_big_tiles_but_keep_one():
    kept = _prune(T.FWD_TILES, torch.float16, 64, n=17)
    assert kept and all(m <= 32 and n <= 32 for m, n, _, _ in kept)


@pytest.mark.parametrize("name", [n for n in ALL_TILES
                                  if getattr(T, n).max_dim("fp32") < 128])
def test_fp32_beyond_the_largest_unspilled_head_dim_is_refused(name):
    tiles = getattr(T, name)
    limit = tiles.max_dim("fp32")
    assert limit >= 64  # fp32 runs every kernel up to D = 64
    assert _prune(tiles, torch.float32, limit)
    with pytest.raises(ValueError, match=rf"head dim {limit + 16} .* torch\.float32 inputs is "
                                         rf"above {limit}, the largest padded head dim"):
        _prune(tiles, torch.float32, limit + 16)
