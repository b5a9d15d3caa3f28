"""Builds fastattnreg._C, the C++ CPU kernels, with torch.utils.cpp_extension and ninja.

Install with `pip install --no-build-isolation .` (or `-e .`) once torch is in the environment:
the extension must be compiled against the torch it will run with, and pip's default build
isolation runs this file in a throw-away environment without it. There, and wherever torch is
not installed, this file prints one line saying so and exits with status 1 before anything else.
"""
import glob
import os
import platform
import sys
import sysconfig

NO_TORCH_MESSAGE = (
    "fastattnreg: the build needs the installed torch, which this Python cannot import (pip's "
    "build isolation hides it): install torch, then run `pip install --no-build-isolation .` "
    "(or -e .)"
)

try:
    import torch
except ModuleNotFoundError as exc:
    if exc.name != "torch":  # torch is there but one of its own imports is missing: show that
        raise
    print(NO_TORCH_MESSAGE, file=sys.stderr, flush=True)
    raise SystemExit(1)

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402


def kernel_flags():
    """Compile flags shared by setup.py and the CMake build (csrc/tests): -O3, OpenMP, BLAS, SIMD."""
    cflags = ["-O3", "-fopenmp", "-DNDEBUG"]
    # x86-64 torch wheels carry MKL inside libtorch_cpu and export its sgemm_/dgemm_ (blas.h).
    if torch.backends.mkl.is_available():
        cflags.append("-DFASTATTNREG_MKL_BLAS")
    # at::vec's SIMD paths (exp, reductions) for the row passes, for the CPU this build runs on
    # (an editable install is built where it runs): AVX-512 where present, else AVX2; and the
    # AVX512-BF16 instructions of the bf16 kernels (the AMX ones included: their operand packing
    # uses them) where the CPU has them (csrc/cpu/simd_level.h checks the CPU again at run time
    # and chooses the kernels). "amx" and "avx512_bf16" build as "auto" does;
    # FASTATTNREG_SIMD=avx512|avx2|default caps the flags, e.g. to build for an older machine.
    simd = os.environ.get("FASTATTNREG_SIMD", "auto")
    wide = simd in ("auto", "amx", "avx512_bf16")
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86 and (wide or simd == "avx512") and _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        cflags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                   "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if wide and _cpu_has("avx512_bf16"):
            cflags.append("-mavx512bf16")
    elif x86 and (wide or simd in ("avx512", "avx2")) and _cpu_has("avx2", "fma"):
        cflags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return cflags


def _cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split()
    except OSError:
        return False
    return all(flag in info for flag in flags)


if os.environ.get("FASTATTNREG_PRINT_FLAGS"):
    print(" ".join(kernel_flags()))
    raise SystemExit(0)

sources = ["csrc/registration.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext with ninja. An editable install compiles in the folder a wheel build
    uses, build/temp.<platform>-<python> (setuptools would use a throw-away one): two levels
    below the tree, so ccache (CCACHE_BASEDIR = the tree) names the sources and the venv's
    headers as a wheel build of the sdist does, and later builds reuse these compiles."""

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(
                "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


setup(
    ext_modules=[
        CppExtension(
            "fastattnreg._C",
            sources,
            # -g0 after Python's own CFLAGS (which carry -g): debug info of the ATen headers makes
            # each object ~20x larger and its compile ~1.7x slower (measured: 41 s against 24 s
            # of CPU for csrc/cpu/attention.cpp), and a release wheel ships without it.
            extra_compile_args=kernel_flags() + ["-g0"],
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
