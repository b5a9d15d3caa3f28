"""Runs the groups of an interpreter case file (tests/triton_*_cases.py) in child processes.

TRITON_INTERPRET=1 must be set before Triton defines the kernels, so the cases cannot run in the
parent pytest process; the child's report comes back in the assertion message on failure.
Every test_triton_<op>.py builds its interpreter tests with `interpreted_groups`, one test per
group, so a failure names its group.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_triton

ROOT = Path(__file__).resolve().parent.parent


def assert_interpreted_group_passes(cases: Path, group: str, timeout: int = 900) -> None:
    """Runs `pytest cases -k interp_<group>` with TRITON_INTERPRET=1; every selected case must
    pass and none may be skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(cases), "-k", f"interp_{group}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    report = res.stdout[-8000:] + res.stderr[-4000:]
    assert res.returncode == 0, report
    assert " passed" in res.stdout and "skipped" not in res.stdout, report


def interpreted_groups(cases: Path, groups):
    """A test, marked slow and needing Triton, that runs `cases -k interp_<group>` under the
    interpreter for each of `groups`. Assign it to a test_* name in a test module."""

    @pytest.mark.slow
    @requires_triton
    @pytest.mark.parametrize("group", list(groups))
    def test(group):
        assert_interpreted_group_passes(cases, group)

    test.__doc__ = f"Runs tests/{cases.name} -k interp_<group> under TRITON_INTERPRET=1."
    return test
