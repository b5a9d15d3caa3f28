"""No pointer offset of the Triton kernels can overflow 32 bits, whatever the problem size.

Maps (B, H, N, N) pass 2**31 elements from N = 46,341 on (i * N + j), masks read through
broadcast strides pass it sooner, and timm's permuted q, k, v have row strides of 3 H D. The
kernels take every product of runtime values in int64. This is checked on each kernel's Triton
IR (tests/triton_offsets.py; no GPU, no interpreter: the interpreter cannot show it without
tensors of more than 2**31 elements), for every specialisation that changes the addressing, with
sizes and strides typed i32 as Triton types them below 2**31. A deliberately 32-bit kernel shows
the check can fail.
"""
import itertools

import pytest

import fastattnreg

pytestmark = [
    pytest.mark.skipif(
        not fastattnreg.backend.triton_installed() or fastattnreg.backend._triton_interpret,
        reason="needs Triton's compiler frontend (not the interpreter)"),
    pytest.mark.slow,  # compiles every kernel specialisation to Triton IR
]

if fastattnreg.backend.triton_installed():  # these modules import Triton
    import triton
    import triton.language as tl

    from fastattnreg.triton import attention as A
    from fastattnreg.triton import match as M
    from fastattnreg.triton import refiner as R
    from triton_offsets import jit_function, overflowing_offsets, triton_ir

    @triton.jit
    def _maps_32bit(Maps, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, BLOCK)
        tl.store(Maps + i[:, None] * N + j[None, :], 0.0)

    @triton.jit
    def _maps_64bit(Maps, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, BLOCK)
        tl.store(Maps + (i.to(tl.int64)[:, None] * N + j[None, :]), 0.0)


def _attention_cases():
    tile = dict(HEAD_DIM=48, D_PAD=64, EVEN_D=False, TEACHER_DIM=48, TD_PAD=64, EVEN_TD=False,
                UPCAST=False, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64)
    no_teacher = dict(TEACHER=False, KIND=0, CLS=False)
    for mask in (0, 1, 2):
        yield A._fwd_kernel, dict(MASK=mask, DROPOUT=True, TEACHER_LSE=False, **tile)
        yield A._key_mean_kernel, dict(MASK=mask, **tile)
        yield A._delta_kernel, dict(HAS_DO=True, HAS_DLSE=True, HAS_G=True, MASK=mask, **tile)
        for dq_pass in (False, True):
            yield A._bwd_kernel, dict(DQ_PASS=dq_pass, HAS_DO=True, HAS_G=True, MASK=mask,
                                      DROPOUT=True, MASK_GRAD=mask == 2, **no_teacher, **tile)
        for head_mean in (False, True):
            yield A._maps_kernel, dict(HEAD_MEAN=head_mean, MASK=mask, **tile)


def _match_cases():
    """The match loss's own kernels, and attention's kernels with the teacher switched on."""
    tile = dict(HEAD_DIM=48, D_PAD=64, EVEN_D=False, TEACHER_DIM=40, TD_PAD=64, EVEN_TD=False,
                UPCAST=False, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64)
    for mask in (0, 1, 2):
        yield A._fwd_kernel, dict(TEACHER_LSE=True, DROPOUT=False, MASK=mask, **tile)
    for kind, cls, mask in itertools.product((0, 1, 2), (False, True), (0, 1, 2)):
        flags = dict(KIND=kind, CLS=cls, MASK=mask, **tile)
        yield M._match_loss_kernel, flags
        if kind == 1:
            yield M._match_c_kernel, dict(CLS=cls, MASK=mask, **tile)
        for dq_pass in (False, True):
            yield A._bwd_kernel, dict(DQ_PASS=dq_pass, HAS_DO=True, HAS_G=False, DROPOUT=False,
                                      MASK_GRAD=False, TEACHER=True, **flags)


def _refiner_cases():
    tile = dict(KS=3, HAS_KEEP=True, HP=16, CP=16, BLOCK_M=16, BLOCK_N=16)
    for stage in (1, 2, 3, 4):
        yield R._stats_kernel, dict(STAGE=stage, **tile)
        yield R._grad_kernel, dict(STAGE=stage, W_ROWS=3 * 3 + 2 * 16 + 1, **tile)
    for export in (0, 1, 2, 3):
        yield R._out_kernel, dict(HEAD_DIM=48, D_BLOCK=32, UPCAST=False, EXPORT=export, **tile)


@pytest.mark.parametrize("cases", [_attention_cases, _match_cases, _refiner_cases],
                         ids=["attention", "match", "refiner"])
def test_every_kernel_takes_products_of_runtime_values_in_int64(cases):
    bad = {}
    for kernel, constexprs in cases():
        found = overflowing_offsets(triton_ir(kernel, constexprs))
        if found:
            flags = {k: v for k, v in constexprs.items() if k.isupper() and k not in (
                "HEAD_DIM", "D_PAD", "D_BLOCK", "EVEN_D", "TEACHER_DIM", "TD_PAD", "EVEN_TD",
                "UPCAST", "PRECISION", "BLOCK_M", "BLOCK_N", "HP", "CP", "KS", "W_ROWS")}
            bad[f"{jit_function(kernel).__name__} {flags}"] = found
    assert not bad, bad


def test_the_check_finds_a_32bit_map_offset():
    assert overflowing_offsets(triton_ir(_maps_32bit, {"BLOCK": 64}))
    assert not overflowing_offsets(triton_ir(_maps_64bit, {"BLOCK": 64}))
