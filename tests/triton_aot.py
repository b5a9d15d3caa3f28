"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, without a GPU.

A kernel is compiled by triton.compile from an ASTSource (the @triton.jit function under its
autotune / heuristics wrappers) with a GPUTarget("cuda", arch, 32): Triton's frontend, its
passes, LLVM and the ptxas that ships with Triton, no driver. ptxas runs with -v; its report
(captured through Triton's dump_ptxas_log knob) gives the registers and spill bytes per thread,
and the compiled kernel's metadata the shared memory per block.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import NamedTuple

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton_offsets import jit_function, signature

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class Compiled(NamedTuple):
    registers: int
    spill_bytes: int  # spill stores per thread (ptxas -v)
    shared_bytes: int


def compile_kernel(kernel, constexprs: dict, dtype: str, arch: int, num_warps: int,
                   num_stages: int) -> Compiled:
    """Compiles one variant for sm_<arch> (sm_90a for 90); raises on a compile error. Values of
    constexprs the kernel does not have are left out."""
    fn = jit_function(kernel)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    src = ASTSource(fn, signature(fn, constexprs, dtype), constexprs)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {fn.__name__}:\n{text[-2000:]}")
    return Compiled(int(regs.group(1)), int(spills.group(1)), int(compiled.metadata.shared))
