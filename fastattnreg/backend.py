"""Which implementation runs an op: "auto" | "cpp" | "triton" | "reference".

"auto" picks the C++ kernels for CPU tensors when the extension is built, the Triton kernels for
CUDA tensors when Triton is installed, else the plain-PyTorch reference. The environment variable
FASTATTNREG_BACKEND overrides "auto" (e.g. FASTATTNREG_BACKEND=reference to compare runs).
Without the C++ extension the package still imports (one warning; the reference and Triton
backends work), unless FASTATTNREG_REQUIRE_CPP=1: then `import fastattnreg` raises ImportError,
so a test run or job that needs the C++ kernels fails at once instead of quietly falling back.
"triton" also runs CPU tensors when TRITON_INTERPRET=1 was set before fastattnreg was imported
(Triton's interpreter: slow, for tests); the variable is read once, as Triton itself reads it
when the kernels are defined.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")
ENV_VAR = "FASTATTNREG_BACKEND"
REQUIRE_CPP_VAR = "FASTATTNREG_REQUIRE_CPP"

_cpp_error: str | None = None
_cpp_module = None
try:
    _cpp_module = importlib.import_module("fastattnreg._C")  # runs the TORCH_LIBRARY registrations
    _cpp_loaded = True
except ImportError as exc:  # not built, or built against another torch
    if os.environ.get(REQUIRE_CPP_VAR, "0") == "1":
        raise ImportError(
            f"fastattnreg: the C++ extension fastattnreg._C did not load ({exc}) and "
            f"{REQUIRE_CPP_VAR}=1 requires it. Build it with `pip install "
            "--no-build-isolation -e .` (or `python setup.py build_ext --inplace`)."
        ) from exc
    _cpp_loaded = False
    _cpp_error = str(exc)
    warnings.warn(
        f"fastattnreg: the C++ extension fastattnreg._C did not load ({exc}); only the reference "
        "backend is available. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


# Whether the Triton kernels are defined at all (fastattnreg.ops imports them only if so) and
# whether they were defined for Triton's CPU interpreter.
try:
    importlib.import_module("triton")
    _triton_installed = True
except ImportError:  # not installed (CPU-only environments): the other backends still work
    _triton_installed = False
_triton_interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpp_available() -> bool:
    """True when the C++ CPU kernels are built and registered in torch.ops.fastattnreg."""
    return _cpp_loaded


def triton_installed() -> bool:
    """True when Triton can be imported, so the triton_attention_* ops are registered."""
    return _triton_installed


def triton_available() -> bool:
    """True when the Triton kernels can run here: Triton is installed and either a CUDA device
    is present or TRITON_INTERPRET=1 was set before fastattnreg was imported."""
    return _triton_installed and (_triton_interpret or torch.cuda.is_available())


# The variables that cap the instruction sets of the libraries under torch's CPU ops, with what
# they mean unset: MKL (float matmuls) and oneDNN (convolutions) then pick the widest the CPU has.
NUMERICS_VARS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def cpu_numerics() -> dict:
    """The instruction sets that decide the rounding of CPU float ops in this process.

    Two machines give bitwise the same training numbers only where every entry agrees: "aten"
    (torch's own vector kernels, capped by ATEN_CPU_CAPABILITY), "kernels" (what this package's
    C++ kernels were compiled for, capped by FASTATTNREG_SIMD at build time; None without the
    extension) and MKL's and oneDNN's caps ("auto" when unset). docs/results.md shows the
    settings that reproduce an AVX2 machine's numbers on an AVX-512 one.
    """
    out = {"aten": torch.backends.cpu.get_cpu_capability().lower(),
           "kernels": _cpp_module._vector_isa() if _cpp_module is not None else None}
    for var in NUMERICS_VARS:
        out[var] = os.environ.get(var, "auto")
    return out


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend ("cpp" | "triton" | "reference") for tensors on `device`.

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here.
    """
    check_backend_name(backend)
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "auto")
        if override not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}; got {override!r}")
        backend = override
    if backend == "auto":
        if device.type == "cpu" and _cpp_loaded:
            return "cpp"
        if device.type == "cuda" and triton_available():
            return "triton"
        return "reference"
    if backend == "cpp":
        if not _cpp_loaded:
            raise RuntimeError(
                "backend='cpp' is not available: fastattnreg._C did not load "
                f"({_cpp_error}); build it with `pip install --no-build-isolation -e .`"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors only; got tensors on {device}")
    if backend == "triton":
        if not triton_available():
            why = ("Triton is not installed" if not _triton_installed else
                   "no CUDA device is present and TRITON_INTERPRET=1 was not set before "
                   "importing fastattnreg")
            raise RuntimeError(
                f"backend='triton' is not available: {why}; use backend='cpp' (CPU) or "
                "'reference'"
            )
        if device.type != "cuda" and not _triton_interpret:
            raise RuntimeError(
                f"backend='triton' runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                f"got tensors on {device}"
            )
    return backend
