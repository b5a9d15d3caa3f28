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
