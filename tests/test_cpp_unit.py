"""Builds the C++ unit tests (csrc/tests, CMakeLists.txt) against the installed torch and runs
them with ctest.

The build lives in build/cmake-tests (git-ignored) and is reused across runs, so a second run
only recompiles what changed. The kernel compile flags come from setup.py (one source of truth:
`FASTATTNREG_PRINT_FLAGS=1 python setup.py` prints them).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cmake-tests"
CUDA_ROOT = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))

CONFIGURE_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 1200
CTEST_TIMEOUT_S = 900


def _run(cmd, timeout, what, env=None, cwd=ROOT, merge_stderr=True):
    """Runs cmd (from the repo root by default) and returns its stdout; fails the test with the
    captured output if it fails or runs past `timeout` seconds."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        cmdline = " ".join(map(str, cmd))
        pytest.fail(f"{what} timed out after {timeout} s: {cmdline}\n{out[-20000:]}")
    elapsed = time.monotonic() - t0
    print(f"[cpp-unit] {what}: {elapsed:.1f} s")
    if proc.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"{proc.stdout[-20000:]}{proc.stderr[-5000:] if proc.stderr else ''}"
        )
    return proc.stdout


def _torch_prefix_and_kernel_flags():
    """torch's CMake prefix path and the kernel flags, from one Python process (one torch import).
    setup.py prints the flags on stdout and exits; torch's warnings go to stderr."""
    code = (
        "import os, runpy, torch\n"
        "print(torch.utils.cmake_prefix_path, flush=True)\n"
        "os.environ['FASTATTNREG_PRINT_FLAGS'] = '1'\n"
        "runpy.run_path('setup.py')\n"
    )
    out = _run([sys.executable, "-c", code], 120, "torch prefix and kernel flags",
               merge_stderr=False)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert len(lines) >= 2, f"expected the prefix and the flags, got: {out!r}"
    return lines[0], lines[-1]


def _cached(var):
    cache = BUILD_DIR / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(var + ":"):
            return line.split("=", 1)[1]
    return None


@pytest.mark.slow
def test_cpp_unit():
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake/ctest not installed")

    prefix, flags = _torch_prefix_and_kernel_flags()
    wanted = {"CMAKE_PREFIX_PATH": prefix, "FASTATTNREG_KERNEL_FLAGS": flags}

    # A build tree configured for another checkout (a moved or copied repo) cannot be reused.
    home = _cached("CMAKE_HOME_DIRECTORY")
    if home is not None and Path(home).resolve() != ROOT:
        shutil.rmtree(BUILD_DIR)

    # Configure on a fresh tree, after a configure that did not finish (no generated files), or
    # when the torch install or the flags changed; otherwise the build step below re-runs CMake
    # by itself if CMakeLists.txt changed.
    generated = (BUILD_DIR / "CTestTestfile.cmake").exists()
    if not generated or any(_cached(var) != value for var, value in wanted.items()):
        cmd = ["cmake", "-S", ROOT, "-B", BUILD_DIR, "-DCMAKE_BUILD_TYPE=Release"]
        cmd += [f"-D{var}={value}" for var, value in wanted.items()]
        if (CUDA_ROOT / "bin" / "nvcc").exists():
            # The pip torch is a CUDA build; its CMake config needs a toolkit (BUILD-NOTES.md).
            cmd += [
                f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_ROOT}",
                f"-DCMAKE_CUDA_COMPILER={CUDA_ROOT / 'bin' / 'nvcc'}",
                "-DTORCH_CUDA_ARCH_LIST=9.0",
            ]
        if _cached("CMAKE_GENERATOR") is None and shutil.which("ninja"):
            cmd += ["-G", "Ninja"]
        _run(cmd, CONFIGURE_TIMEOUT_S, "cmake configure")

    _run(["cmake", "--build", BUILD_DIR, "-j", "2"], BUILD_TIMEOUT_S, "cmake build")
    out = _run(
        ["ctest", "--output-on-failure", "--timeout", "600"],
        CTEST_TIMEOUT_S,
        "ctest",
        cwd=BUILD_DIR,
    )
    print(out)
