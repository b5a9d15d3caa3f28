"""Shared fixtures and helpers for the test suite."""
import pytest
import torch

import fastattnreg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cpp = pytest.mark.skipif(
    not fastattnreg.cpp_available(), reason="fastattnreg._C is not built"
)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
