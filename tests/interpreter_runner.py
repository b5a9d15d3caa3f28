"""Runs an interpreter case file (tests/triton_*_cases.py) in a child process.

TRITON_INTERPRET=1 must be set before Triton defines the kernels, so the cases cannot run in the
parent pytest process; the child's report (its failing cases by name) comes back in the
assertion message on failure. Every test_triton_<op>.py builds its interpreter tests with
`interpreted_cases`, one test per case file of the op (tests/triton_<op>_cases.py and, for
attention masks, tests/triton_<op>_mask_cases.py): one child runs every case of the file, since
a child's start (torch, Triton and the interpreter's rewrite of each kernel) costs about 5 s.
The cases of a file are named test_interp_<group>_..., so `-k interp_<group>` runs one group by
hand.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, requires_triton


def assert_interpreted_cases_pass(cases: Path, timeout: int = 900) -> None:
    """Runs `pytest cases -k interp_` with TRITON_INTERPRET=1; every case must pass and none may
    be skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(cases), "-k", "interp_"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    report = res.stdout[-8000:] + res.stderr[-4000:]
    assert res.returncode == 0, report
    assert " passed" in res.stdout and "skipped" not in res.stdout, report


def interpreted_cases(cases: Path):
    """A test, marked slow and needing Triton, that runs every case of `cases` under the
    interpreter in one child process. Assign it to a test_* name in a test module."""

    @pytest.mark.slow
    @requires_triton
    def test():
        assert_interpreted_cases_pass(cases)

    test.__doc__ = f"Runs tests/{cases.name} under TRITON_INTERPRET=1 in a child process."
    return test
