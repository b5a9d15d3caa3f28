"""Which implementation runs an op: "auto" | "cpp" | "triton" | "reference".

"auto" picks the C++ kernels for CPU tensors when the extension is built, the Triton kernels for
CUDA tensors when they exist, else the plain-PyTorch reference. The environment variable
FASTATTNREG_BACKEND overrides "auto" (e.g. FASTATTNREG_BACKEND=reference to compare runs).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")
ENV_VAR = "FASTATTNREG_BACKEND"

_cpp_error: str | None = None
try:
    importlib.import_module("fastattnreg._C")  # runs the TORCH_LIBRARY registrations
    _cpp_loaded = True
except ImportError as exc:  # not built, or built against another torch
    _cpp_loaded = False
    _cpp_error = str(exc)
    warnings.warn(
        f"fastattnreg: the C++ extension fastattnreg._C did not load ({exc}); only the reference "
        "backend is available. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def cpp_available() -> bool:
    """True when the C++ CPU kernels are built and registered in torch.ops.fastattnreg."""
    return _cpp_loaded


def triton_available() -> bool:
    """True when the Triton kernels can run (they are not part of this build yet)."""
    return False


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
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' is not available in this build: the Triton kernels are not "
            "implemented yet; use backend='cpp' (CPU) or 'reference'"
        )
    return backend
