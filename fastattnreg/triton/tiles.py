"""Tile helpers every Triton kernel here shares, and the tile lists the autotuner picks from.

Tiles are (rows, D_PAD) blocks of a (n_rows, HEAD_DIM) matrix with stride 1 on the head dim; the
head dim is padded to a power of two >= 16 (D_PAD, tl.dot's minimum) and masked. Logits live in
the log2 domain inside the softmax kernels (exp2 is the fast path) and in natural units where a
loss reads them; LSEs are stored in natural log.

Tile sizes (autotuned on the GPU over the short lists below; the interpreter uses one 64 x 64
tile, as autotuning there is pointless and bigger tiles run faster). Every tile in the lists
compiles without register spills for sm_80 and sm_90a (ptxas -v, no spill stores) with the
heaviest flags of its regime; a tile that spills anywhere leaves the list. Each kernel's Tiles
holds three regimes, each split by padded head dim (D_PAD, or the teacher's TD_PAD where that is
larger), and the autotuner's pruning (pruner) offers a launch only the list of its regime and
head dim:
  * plain (16-bit inputs, no mask, dropout, maps' gradient or teacher): at D_PAD <= 64 rows and
    columns of 32 to 128 (128 x 64, 8 warps, 3 stages for the forward); at D_PAD = 128 the
    (BLOCK_M, D_PAD) fp32 accumulators and operand tiles double: the forward keeps 128 x 32
    and 64 x 64 with 8 warps and 2 stages, the backward 32- and 64-row tiles, 2 stages.
  * heavy (16-bit inputs with any of those): a mask tile is read through a (BLOCK_M, BLOCK_N)
    tile of pointers, dropout runs one Philox4x32-10 per entry and the teacher adds its own
    logits: 16- and 32-row tiles for the attention forward and backward, 8 warps for dQ and
    the forward with a teacher at D_PAD = 128.
  * fp32 (3xTF32 dots: every operand split in two, 4-byte tiles): mostly 16-row tiles, one
    stage. At D_PAD = 128 the maps, dK/dV and dQ kernels spill with every tile down to 16 x 16
    (ptxas: 16 bytes to 13 KB per thread), so they have no fp32 list there: such a launch is
    refused with a ValueError naming the head dim, the dtype and the limit (64). The forward,
    the key-mean map, delta and the match rows run fp32 up to D = 128.
  The maps, delta and match-row kernels keep one short list for plain and heavy flags: with a
  mask their 64 x 64 (4 warps, 3 stages) and 128 x 64 tiles spill 40 B to 1.2 KB per thread at
  every head dim, down to D_PAD = 16.
  Tiles larger than the sequence are pruned too (N = 17 needs no 128-row tile).
  Evidence: tests/test_triton_aot.py compiles every kernel over every tile of its lists, each
  dtype and the heaviest flags at padded head dims 64 and 128 (the largest of each range; 16
  and 32 on request) for sm_80 and sm_90a
  with Triton's ptxas (no GPU) and fails on any spill; benchmarks/results/triton_aot.csv holds
  registers, spills and shared memory per variant. The speed of the tiles is measured by the
  autotuner on the GPU only.
"""
from __future__ import annotations

import os

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Set before this module is imported: @triton.jit reads it at decoration.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # the launchers fold it into the scale: exp(x) = exp2(x * LOG2E)
# The same constants for the kernels: a @triton.jit function reads globals only as constexprs.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
# The kernels' compile-time MASK argument: no mask, a bool mask (read as uint8), a float bias.
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_BIAS = tl.constexpr(2)
MAX_GRID_Z = 65535  # CUDA limit of grid axes 1 and 2, where the heads (or query blocks) go

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel; see the module docstring.
# Each Tiles holds, per regime, (largest padded head dim, tiles) pairs in increasing head dim: a
# launch gets the tiles of the first pair that covers its padded head dim. A regime with no pair
# that covers it has no tile that compiles without register spills there: such a launch is
# refused (pruner).


class Tiles(NamedTuple):
    kernel: str  # what the error message of a refused launch names
    plain: tuple
    heavy: tuple
    fp32: tuple

    def for_dim(self, regime: str, d_pad: int) -> tuple:
        """The tiles of `regime` for padded head dim d_pad; () where none compiles unspilled."""
        for top, tiles in getattr(self, regime):
            if d_pad <= top:
                return tiles
        return ()

    def max_dim(self, regime: str) -> int:
        """The largest padded head dim `regime` has tiles for (0: none)."""
        pairs = getattr(self, regime)
        return pairs[-1][0] if pairs else 0

    def all(self) -> tuple:
        return tuple(dict.fromkeys(t for regime in ("plain", "heavy", "fp32")
                                   for _, tiles in getattr(self, regime) for t in tiles))


FWD_TILES = Tiles(
    "the attention forward (_fwd_kernel)",
    plain=((64, ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2),
                 (32, 32, 8, 2))),
           (128, ((64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)))),
    heavy=((64, ((16, 32, 4, 2), (32, 16, 4, 2))),
           (128, ((32, 16, 4, 2), (16, 32, 8, 2)))),
    fp32=((128, ((16, 32, 8, 1),)),))
# The maps, key-mean, delta and match-row kernels hold one list for plain and heavy flags: its
# tiles compile unspilled with the heavy flags, whose instructions include the plain ones'.
_MAPS = ((64, ((64, 32, 8, 2), (32, 32, 4, 2))),
         (128, ((32, 32, 4, 2),)))
MAPS_TILES = Tiles("the attention maps (_maps_kernel)", plain=_MAPS, heavy=_MAPS,
                   fp32=((64, ((16, 32, 8, 1), (16, 16, 8, 1), (32, 16, 8, 1))),))
_KEY_MEAN = ((128, ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 32, 8, 2),
                    (32, 32, 4, 2))),)
KEY_MEAN_TILES = Tiles("the key-mean map (_key_mean_kernel)", plain=_KEY_MEAN, heavy=_KEY_MEAN,
                       fp32=((128, ((64, 32, 8, 2), (16, 32, 8, 1), (32, 16, 8, 1))),))
_DELTA = ((128, ((64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2))),)
DELTA_TILES = Tiles("the backward's delta (_delta_kernel)", plain=_DELTA, heavy=_DELTA,
                    fp32=((128, ((16, 32, 8, 1), (16, 16, 4, 1))),))
_MATCH = ((128, ((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2))),)
MATCH_TILES = Tiles("the match loss's row kernels (_match_loss_kernel, _match_c_kernel)",
                    plain=_MATCH, heavy=_MATCH, fp32=((128, ((16, 16, 4, 1),)),))
DKDV_TILES = Tiles(
    "the backward's dK/dV pass (_bwd_kernel)",
    plain=((64, ((32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 8, 2), (32, 32, 8, 2),
                 (16, 32, 4, 2))),
           (128, ((32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)))),
    heavy=((128, ((32, 32, 8, 2),)),),
    fp32=((64, ((16, 16, 8, 1),)),))
DQ_TILES = Tiles(
    "the backward's dQ pass (_bwd_kernel)",
    plain=((64, ((128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (32, 32, 8, 2),
                 (16, 32, 4, 2))),
           (128, ((64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)))),
    heavy=((64, ((32, 32, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2))),
           (128, ((16, 32, 8, 2),))),
    fp32=((64, ((16, 32, 8, 1), (16, 16, 8, 1))),))
# The interpreter runs each program as numpy on the CPU: fewer, bigger tiles are much faster
# (16 x 16 tiles take 5-10x the time of 64 x 64), and autotuning there is pointless.
_INTERPRET_TILE = (64, 64, 4, 1)

# Every compile-time flag that changes a kernel's work: a kernel's autotuner keys on those of
# them it has (Triton ignores the others and adds the tensors' dtypes).
TUNING_KEY = ("N", "HEAD_DIM", "TEACHER_DIM", "KIND", "CLS", "HAS_DO", "HAS_DLSE", "HAS_G",
              "TEACHER", "TEACHER_LSE", "HEAD_MEAN", "MASK", "DROPOUT", "MASK_GRAD", "DQ_PASS")


def configs(tiles: Tiles) -> list:
    """triton.Configs of every (BLOCK_M, BLOCK_N, num_warps, num_stages) tile of `tiles`; in the
    interpreter the one interpreter tile."""
    tiles = (_INTERPRET_TILE,) if INTERPRET else tiles.all()
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


def regime(dtype: torch.dtype, flags: dict) -> str:
    """"fp32", "heavy" or "plain": which list of a Tiles serves a launch with inputs of `dtype`
    and these compile-time flags."""
    if dtype == torch.float32:
        return "fp32"
    heavy = (flags.get("MASK", 0) != 0 or flags.get("DROPOUT", False) or flags.get("HAS_G", False)
             or flags.get("TEACHER", False) or flags.get("TEACHER_LSE", False))
    return "heavy" if heavy else "plain"


def launch_dim(named_args: dict, flags: dict) -> int:
    """The padded head dim a launch's tiles hold: the larger of the student's (HEAD_DIM) and,
    where the kernel has one, the teacher's (TEACHER_DIM)."""
    dims = [flags.get(name, named_args.get(name)) for name in ("HEAD_DIM", "TEACHER_DIM")]
    dims = [d for d in dims if d is not None]
    return padded_dim(max(dims))


def pruner(tiles: Tiles):
    """The autotuner's early pruning for `tiles`: the configs of the launch's regime and padded
    head dim, less those much larger than the sequence (N = 17 needs no 128-row tile); keeps
    >= 1. A launch whose regime has no tiles at its head dim raises a ValueError."""

    def prune(configs, named_args, **flags):
        if INTERPRET:
            return configs
        dtype = named_args["Q"].dtype
        kind = regime(dtype, flags)
        d_pad = launch_dim(named_args, flags)
        wanted = tiles.for_dim(kind, d_pad)
        if not wanted:
            dims = {name: flags.get(name, named_args.get(name))
                    for name in ("HEAD_DIM", "TEACHER_DIM")}
            raise ValueError(
                f"head dim {dims['HEAD_DIM']} (teacher {dims['TEACHER_DIM']}; tiles padded to "
                f"{d_pad}) with {dtype} inputs is above {tiles.max_dim(kind)}, the largest "
                f"padded head dim at which {tiles.kernel} compiles without register spills "
                f"for these inputs on the Triton backend; use float16 / bfloat16 inputs, a "
                f"smaller head dim, or the 'cpp' or 'reference' backend")
        configs = [c for c in configs
                   if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   in wanted]
        cap = max(32, triton.next_power_of_2(named_args["N"]))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
        if kept:
            return kept
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def traceable(kernel):
    """kernel through torch.library.wrap_triton, so that a triton_op's tracing (torch.compile,
    fake tensors) sees the launch; under the interpreter the kernel itself: interpreted kernels
    run eagerly, and torch before 2.14 refuses them in wrap_triton."""
    return kernel if INTERPRET else wrap_triton(kernel)


def padded_dim(dim: int) -> int:
    """A head dim padded for tl.arange (a power of two) and tl.dot (>= 16)."""
    return max(16, triton.next_power_of_2(dim))


def _dim_heuristics(teacher: bool) -> dict:
    # D_PAD / EVEN_D from HEAD_DIM, and for kernels with a teacher TD_PAD / EVEN_TD from
    # TEACHER_DIM.
    pairs = [("HEAD_DIM", "D_PAD", "EVEN_D")]
    if teacher:
        pairs.append(("TEACHER_DIM", "TD_PAD", "EVEN_TD"))
    heur = {}
    for dim, pad, even in pairs:
        heur[pad] = lambda args, dim=dim: padded_dim(args[dim])
        heur[even] = lambda args, dim=dim: args[dim] == padded_dim(args[dim])
    return heur


def tuned(tiles: Tiles, teacher: bool = False):
    """autotune (block sizes over `tiles`) over heuristics (the padded head dims; with `teacher`
    the teacher's too): the heuristics run after a config is picked, the order torch.compile's
    kernel wrapper understands."""

    def wrap(kernel):
        heur = triton.heuristics(_dim_heuristics(teacher))(kernel)
        return triton.autotune(configs=configs(tiles), key=list(TUNING_KEY),
                               prune_configs_by={"early_config_prune": pruner(tiles)})(heur)

    return wrap


# ------------------------------------------------------------------------------- jit helpers


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with an fp32 result. UPCAST (interpreter + bf16 only): the interpreter multiplies
    bf16 bit patterns as integers, so the operands go to fp32 first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32. For the interpreter only:
    its fp32 -> bf16 cast truncates, which doubles the rounding error of every bf16 result."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, like, UPCAST: tl.constexpr):
    """fp32 tile x (P or dS) as an operand of a GEMM with `like`: in like's dtype, so 16-bit
    inputs keep the tensor-core GEMM in 16 bits (FlashAttention-2); rounded but fp32 under
    UPCAST (see _round_to_bf16)."""
    if UPCAST:
        return _round_to_bf16(x)
    else:
        return x.to(like.dtype)


@triton.jit
def _load_tile(base, rows, stride_n, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(rows), D_PAD) tile of a (n_rows, HEAD_DIM) matrix; rows and padding read as 0."""
    ptrs = (base + rows.to(tl.int64)[:, None] * stride_n) + offs_d[None, :]
    if EVEN_D:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :],
                       other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, n_rows, offs_d, value, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST: tl.constexpr):
    """Stores an fp32 (len(rows), D_PAD) tile into a contiguous (n_rows, HEAD_DIM) matrix."""
    ptrs = (base + rows.to(tl.int64)[:, None] * HEAD_DIM) + offs_d[None, :]
    if UPCAST:
        value = _round_to_bf16(value)
    value = value.to(base.dtype.element_ty)
    if EVEN_D:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _apply_mask(s, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK: tl.constexpr,
                LOG2_UNITS: tl.constexpr):
    """Logit tile s (BLOCK_M, BLOCK_N), fp32, with the mask applied: plus the float bias
    (MASK_BIAS; times log2(e) when LOG2_UNITS, for logits in log2 units), -inf where the bool
    mask is False (MASK_BOOL); -inf on keys >= N.

    mask_ptr: the mask at (b, h, 0, 0) of a (B, H, N, N) broadcast view (bool read as uint8);
    stride_ai, stride_aj: its query and key strides (0 where broadcast)."""
    valid = (cols < N)[None, :]
    if MASK != MASK_NONE:
        inside = (rows < N)[:, None] & valid
        ptrs = mask_ptr + (rows.to(tl.int64)[:, None] * stride_ai
                           + cols.to(tl.int64)[None, :] * stride_aj)
        if MASK == MASK_BOOL:
            valid = valid & (tl.load(ptrs, mask=inside, other=0) != 0)
        elif LOG2_UNITS:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * _LOG2E
        else:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Logit tile S (BLOCK_M, BLOCK_N), fp32, log2 units: qk_scale * q k^T with the mask applied
    by _apply_mask (mask_ptr and strides as there)."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    return _apply_mask(s, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, True)


@triton.jit
def _probs(s, lse2, rows, N):
    """P tile (BLOCK_M, BLOCK_N) fp32 from a logit tile of _logits and the log2-domain LSE;
    0 on rows >= N and wherever s = -inf (masked, keys >= N). A row whose every key is masked
    has lse2 = -inf: 0 stands in, so its P is exp2(-inf) = 0 rather than NaN."""
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    p = tl.exp2(s - lse2[:, None])
    return tl.where((rows < N)[:, None], p, 0.0)


@triton.jit
def _lse_step(m_i, l_i, s, LOG2: tl.constexpr):
    """One key block of an online log-sum-exp over the logit tile s (BLOCK_M, BLOCK_N), -inf on
    keys that take no part: exp2 (log2 units: the row sum's instructions of the attention
    forward, so a teacher that copies the student gets its l_i bit for bit) or exp (natural
    units). m_new is -inf while every key so far is masked (l_i still 0): 0 stands in for it,
    so exp gives 0 rather than NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    if LOG2:
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
    else:
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
    return m_new, l_i


@triton.jit
def _lse_end(m_i, l_i, LOG2: tl.constexpr):
    """The natural-log LSE of an online pass; -inf for a row with no key (l_i = 0)."""
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    if LOG2:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    return tl.where(dead, float("-inf"), lse)


@triton.jit
def _program_head(H):
    """(z, z64, b, h) of this program's head: grid axis 1 is z = b * H + h; z64, b, h int64."""
    z = tl.program_id(1)
    return z, z.to(tl.int64), (z // H).to(tl.int64), (z % H).to(tl.int64)


@triton.jit
def _query_program(H, BLOCK_M: tl.constexpr):
    """(z, z64, b, h, rows) of a program that owns query block program_id(0) of head z."""
    z, z64, b, h = _program_head(H)
    return z, z64, b, h, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _row_stats(Lse, Delta, z64, N, rows):
    """The log2-domain LSE and the backward's delta of the given rows of head z64 (0 past N)."""
    lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
    delta = tl.load(Delta + (z64 * N + rows), mask=rows < N, other=0.0)
    return lse2, delta


# ------------------------------------------------------------------------------ launch helpers


def dot_options(dtype: torch.dtype) -> dict:
    # fp32 inputs: "tf32x3" (three TF32 tensor-core products, error near fp32's) keeps the maps
    # fp32-exact; plain TF32 would cost ~1e-3, and "ieee" (FMA dots) spills kilobytes of
    # registers per thread at these tile sizes (ptxas, sm_90). fp16/bf16 ignore the argument.
    upcast = INTERPRET and dtype == torch.bfloat16
    return {"UPCAST": upcast, "PRECISION": "tf32x3" if dtype == torch.float32 else "tf32"}


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    # (batch, head, token) strides of a (B, H, N, D) tensor whose last dim has stride 1.
    return t.stride(0), t.stride(1), t.stride(2)


def mask_args(attn_mask, placeholder: torch.Tensor, B: int, H: int, N: int):
    """(tensor, (stride_b, stride_h, stride_i, stride_j), MASK) of a mask for the kernels.

    The mask is expanded to a (B, H, N, N) view (stride 0 on every broadcast axis; no copy) and
    a bool mask is viewed as uint8 (the same bytes). Without a mask `placeholder` holds the
    pointer's place and is never read (MASK_NONE)."""
    if attn_mask is None:
        return placeholder, (0, 0, 0, 0), MASK_NONE.value
    view = attn_mask.expand(B, H, N, N)
    if view.dtype == torch.bool:
        return view.view(torch.uint8), tuple(view.stride()), MASK_BOOL.value
    return view, tuple(view.stride()), MASK_BIAS.value
