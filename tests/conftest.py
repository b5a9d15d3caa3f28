"""Shared fixtures, skip markers, paths (TESTS, ROOT), tolerances and helpers for the test suite.

Skips: CUDA-only tests use `requires_cuda` / `requires_cuda_triton`, whose reasons start with
"needs CUDA"; with FASTATTNREG_NO_SKIPS=1 (scripts/run_tests.sh) every other skip fails the run
(tests/skip_policy.py).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattnreg
import interpreter_device_calls
import long_first
import skip_policy

CUDA_SKIP_REASON = f"{skip_policy.CUDA_SKIP_PREFIX}: no CUDA device is present"
TESTS = Path(__file__).resolve().parent  # this folder
ROOT = TESTS.parent  # the repository's root folder
# The interpreter case files' tolerance for float32 kernels against a float64 reference on
# unit-scale inputs (a check scales it by the reference's size where that grows).
FP32_TOL = 1e-4



def cpp_schema(name: str) -> str:
    """The schema text csrc/registration.cpp gives op `name`, e.g. "attention_fwd(Tensor q, ...)
    -> (...)" (its adjacent string literals joined), for the tests that hold the Triton ops'
    schemas, stated in Python, to the C++ ones."""
    source = (ROOT / "csrc" / "registration.cpp").read_text()
    for call in re.findall(r"m\.def\((.*?)\);", source, flags=re.S):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        if text.startswith(name + "("):
            return text
    raise AssertionError(f"no m.def of {name} in csrc/registration.cpp")

def pytest_configure(config):
    skip_policy.register(config)
    if os.environ.get("TRITON_INTERPRET") == "1" and fastattnreg.backend.triton_installed():
        # The interpreter case files' children (tests/interpreter_runner.py): helper calls inside
        # a launch skip Triton's repeated language patching (tests/interpreter_device_calls.py).
        interpreter_device_calls.install()


def _long_minutes(item) -> float:
    """The `minutes` of a test's `long` marker (its approximate time on one core), else 0."""
    marker = item.get_closest_marker("long")
    return 0.0 if marker is None else float(marker.kwargs["minutes"])


def pytest_collection_modifyitems(items):
    """Puts each test marked `long(minutes=...)` (the ahead-of-time Triton compiles, the CMake
    and wheel builds) at the start of a pytest-xdist worker's share (tests/long_first.py), so
    every one starts at once; without xdist (one share) they simply come first."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    items[:] = long_first.order(items, _long_minutes, workers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cpp = pytest.mark.skipif(
    not fastattnreg.cpp_available(), reason="fastattnreg._C is not built"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
requires_triton = pytest.mark.skipif(not fastattnreg.backend.triton_installed(),
                                     reason="Triton is not installed")


def _cuda_triton_skip_reason():
    # Without CUDA the test is CUDA-only (an allowed skip); with CUDA but without Triton it is a
    # broken install, whose skip FASTATTNREG_NO_SKIPS=1 refuses.
    if not torch.cuda.is_available():
        return CUDA_SKIP_REASON
    if not fastattnreg.backend.triton_installed():
        return "Triton is not installed (a CUDA device is present)"
    return None


# CUDA tests of the Triton kernels.
requires_cuda_triton = pytest.mark.skipif(_cuda_triton_skip_reason() is not None,
                                          reason=_cuda_triton_skip_reason() or "")


def rerun_without_triton_interpreter(request) -> bool:
    """For tests of what happens without Triton's interpreter. When this process runs it
    (TRITON_INTERPRET=1 before the import), runs the calling test again in a child pytest with
    TRITON_INTERPRET unset, asserts that it passed and returns True; otherwise returns False and
    the test goes on in this process."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          request.node.nodeid], cwd=request.config.rootpath, env=env,
                         capture_output=True, text=True, timeout=300)
    report = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0 and re.search(r"^1 passed\b", res.stdout, re.M), report
    return True


class OpDtypes(TorchDispatchMode):
    """Records the dtype of every tensor argument of each fastattnreg op it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastattnreg":
            self.calls.append((func._schema.name.split("::")[1],
                               [a.dtype if isinstance(a, torch.Tensor) else None for a in args]))
        return func(*args, **(kwargs or {}))

    def dtypes(self, op, index):
        """The dtypes argument `index` of `op` ("attention_fwd" or "fastattnreg::attention_fwd")
        had, over every call (empty: never called)."""
        op = op.split("::")[-1]
        return {args[index] for name, args in self.calls if name == op}


# FASTATTNREG_SIMD values the bf16 tests run under: AMX tiles, bf16 operand pairs, float kernels.
BF16_KERNELS = ("amx", "avx512_bf16", "avx512")


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(f.read().split())


def bf16_kernels_run(simd: str) -> str:
    """What a bf16 call runs with FASTATTNREG_SIMD=simd on this machine and build: "amx",
    "avx512_bf16" or "float32". setup.py compiles the bf16 kernels where the building CPU has
    AVX512-BF16 and FASTATTNREG_SIMD did not cap the build; AMX also needs the CPU's tiles and
    torch's oneDNN switched on."""
    import fastattnreg._C as native

    flags = _cpu_flags()
    if native._vector_isa() != "avx512" or "avx512_bf16" not in flags:
        return "float32"
    if simd in ("amx", "auto") and torch.backends.mkldnn.enabled and \
            {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    return "avx512_bf16" if simd == "avx512_bf16" else "float32"


@pytest.fixture(params=BF16_KERNELS)
def bf16_kernels(request, monkeypatch):
    """Selects the bf16 kernels for the test (FASTATTNREG_SIMD) and checks that the selection
    took; the value is the FASTATTNREG_SIMD setting."""
    import fastattnreg._C as native

    monkeypatch.setenv("FASTATTNREG_SIMD", request.param)
    assert native._bf16_kernels() == bf16_kernels_run(request.param)
    return request.param


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Property-based tests (tests/test_properties.py): "ci", the default, draws a fixed set of
# examples (derandomize: the same every run, no example database); `--hypothesis-profile=thorough`
# draws ten times as many, afresh each run, for local runs. Without hypothesis installed (it is
# in pyproject's test extra) test_properties.py skips itself, saying so.
try:
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=150, derandomize=True, database=None,
                              deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
    settings.register_profile("thorough", max_examples=1500, deadline=None,
                              suppress_health_check=_SLOW_OK, print_blob=True)
    settings.load_profile("ci")
