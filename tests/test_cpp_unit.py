"""Builds the C++ unit tests (csrc/tests, CMakeLists.txt) against the installed torch and runs
them with ctest.

The tests link the kernel objects of the extension's own build: `setup.py build_ext` compiles
them into build/cpp-objects (git-ignored), with the venv's bin folder first on PATH, so that
torch's build uses ninja and ccache from there where they are installed (scripts/setup_env.sh
installs both and builds the extension through ccache, so these compiles are cache hits).

cmake, ctest and ninja are taken from the folder of sys.executable first (the pip `cmake` and
`ninja` packages that scripts/setup_env.sh installs into .venv/bin), then from PATH. Without
cmake/ctest the test skips, and fails under FASTATTNREG_REQUIRE_CPP=1 (scripts/run_tests.sh).

The CMake build lives in build/cmake-tests (git-ignored) and is reused across runs, so a second
run only recompiles what changed. The kernel compile flags come from setup.py (one source of truth:
`FASTATTNREG_PRINT_FLAGS=1 python setup.py` prints them).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

BUILD_DIR = ROOT / "build" / "cmake-tests"
OBJECTS_DIR = ROOT / "build" / "cpp-objects"
CUDA_ROOT = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))

OBJECTS_TIMEOUT_S = 1200
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


def find_tool(name):
    """Path of the executable `name`: next to sys.executable (this venv's bin folder; the path is
    not resolved, so a venv's python symlink still points at the venv), else on PATH, else None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


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


def _build_kernel_objects():
    """Compiles the extension's objects into OBJECTS_DIR with setup.py (incremental: ninja
    recompiles only what changed), with this interpreter's bin folder first on PATH. ccache's
    base dir is the checkout: it names the sources relative to the build folder, two levels
    down as in a wheel build's, so the sdist test's wheel build (test_packaging.py) reuses these
    compiles from any folder."""
    env = {**os.environ, "CCACHE_BASEDIR": str(ROOT),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    _run([sys.executable, "setup.py", "build_ext", "--build-temp", OBJECTS_DIR,
          "--build-lib", OBJECTS_DIR / "lib"], OBJECTS_TIMEOUT_S, "kernel objects (setup.py)",
         env=env)


def _cmake_version(cmake):
    """"X.Y.Z" of `cmake --version` (the pip cmake's bin/cmake is a Python launcher of a binary
    elsewhere, so paths cannot be compared with the CMAKE_COMMAND of a build tree)."""
    out = _run([cmake, "--version"], 60, "cmake --version", merge_stderr=False)
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert match, f"unexpected `cmake --version` output: {out!r}"
    return ".".join(match.groups())


def _cached(var):
    cache = BUILD_DIR / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(var + ":"):
            return line.split("=", 1)[1]
    return None


@pytest.mark.slow
@pytest.mark.long(minutes=1)
def test_cpp_unit():
    cmake, ctest, ninja = find_tool("cmake"), find_tool("ctest"), find_tool("ninja")
    if cmake is None or ctest is None:
        where = f"next to {sys.executable} or on PATH"
        if os.environ.get("FASTATTNREG_REQUIRE_CPP", "0") == "1":
            pytest.fail(f"cmake/ctest not found {where}, and FASTATTNREG_REQUIRE_CPP=1 requires "
                        "the C++ unit tests: `pip install cmake` (scripts/setup_env.sh does)")
        pytest.skip(f"cmake/ctest not found {where}")

    prefix, flags = _torch_prefix_and_kernel_flags()
    _build_kernel_objects()
    wanted = {"CMAKE_PREFIX_PATH": prefix, "FASTATTNREG_KERNEL_FLAGS": flags,
              "FASTATTNREG_OBJECTS_DIR": str(OBJECTS_DIR)}

    # A build tree configured for another checkout (a moved or copied repo) or by another cmake
    # version (e.g. the system cmake before the pip one) is not reused.
    home = _cached("CMAKE_HOME_DIRECTORY")
    cached_version = ".".join(str(_cached(f"CMAKE_CACHE_{part}_VERSION"))
                              for part in ("MAJOR", "MINOR", "PATCH"))
    if home is not None and (Path(home).resolve() != ROOT or
                             cached_version != _cmake_version(cmake)):
        shutil.rmtree(BUILD_DIR)

    # Configure on a fresh tree, after a configure that did not finish (no generated files), or
    # when the torch install or the flags changed; otherwise the build step below re-runs CMake
    # by itself if CMakeLists.txt changed.
    generated = (BUILD_DIR / "CTestTestfile.cmake").exists()
    if not generated or any(_cached(var) != value for var, value in wanted.items()):
        cmd = [cmake, "-S", ROOT, "-B", BUILD_DIR, "-DCMAKE_BUILD_TYPE=Release"]
        cmd += [f"-D{var}={value}" for var, value in wanted.items()]
        if (CUDA_ROOT / "bin" / "nvcc").exists():
            # The pip torch is a CUDA build; its CMake config needs a toolkit.
            cmd += [
                f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_ROOT}",
                f"-DCMAKE_CUDA_COMPILER={CUDA_ROOT / 'bin' / 'nvcc'}",
                "-DTORCH_CUDA_ARCH_LIST=9.0",
            ]
        if _cached("CMAKE_GENERATOR") is None and ninja is not None:
            # Named by path: .venv/bin, where the pip ninja lives, need not be on PATH.
            cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _run(cmd, CONFIGURE_TIMEOUT_S, "cmake configure")

    _run([cmake, "--build", BUILD_DIR, "-j", "2"], BUILD_TIMEOUT_S, "cmake build")
    out = _run(
        [ctest, "--output-on-failure", "--timeout", "600"],
        CTEST_TIMEOUT_S,
        "ctest",
        cwd=BUILD_DIR,
    )
    print(out)


def test_find_tool_looks_next_to_the_interpreter_first(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "cmake"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert find_tool("cmake") == str(tool)
    assert find_tool("ctest") == shutil.which("ctest")  # not there: PATH
    tool.chmod(0o644)  # not executable: not taken
    assert find_tool("cmake") == shutil.which("cmake")


def test_missing_cmake_fails_when_cpp_is_required_else_skips(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_tool", lambda name: None)
    monkeypatch.setenv("FASTATTNREG_REQUIRE_CPP", "1")
    with pytest.raises(pytest.fail.Exception, match="cmake/ctest not found"):
        test_cpp_unit()
    monkeypatch.setenv("FASTATTNREG_REQUIRE_CPP", "0")
    with pytest.raises(pytest.skip.Exception, match="cmake/ctest not found"):
        test_cpp_unit()
