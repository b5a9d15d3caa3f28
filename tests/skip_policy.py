"""pytest plugin: with FASTATTNREG_NO_SKIPS=1 a run fails when a test skips for any reason other
than needing CUDA.

A machine without a GPU cannot run the CUDA tests, so their skips are expected; every other skip
(the C++ extension missing, a test dependency or cmake not installed, a condition that no longer
holds) means the run tested less than it reports. CUDA-only tests skip with a reason that starts
with CUDA_SKIP_PREFIX (conftest.requires_cuda); any other skip, and any expected failure (xfail),
is listed in a section of the terminal summary and turns a passing exit status into 1 (a failed
run keeps its own non-zero status, e.g. 5 when no tests were collected).

tests/conftest.py registers it for the suite; `pytest -p skip_policy` (with this folder on
PYTHONPATH) loads it elsewhere.
"""
from __future__ import annotations

import os

import pytest

NO_SKIPS_VAR = "FASTATTNREG_NO_SKIPS"
CUDA_SKIP_PREFIX = "needs CUDA"
PLUGIN_NAME = "fastattnreg-skip-policy"


def skip_reason(report) -> str:
    """The reason of a skipped test or collection report ("Skipped: " prefix removed)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def allowed(reason: str) -> bool:
    return reason.startswith(CUDA_SKIP_PREFIX)


class SkipPolicy:
    """Collects the refused skips of one run and fails the run if there are any."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []  # (node id, reason)

    def _note(self, report) -> None:
        if not report.skipped:
            return
        if hasattr(report, "wasxfail"):
            reason = f"expected failure (xfail): {report.wasxfail}"
        else:
            reason = skip_reason(report)
        if not allowed(reason):
            self.refused.append((report.nodeid, reason))

    def pytest_collectreport(self, report) -> None:  # module-level skips (importorskip, pytestmark)
        self._note(report)

    def pytest_runtest_logreport(self, report) -> None:  # skips in setup or in the test body
        self._note(report)

    def pytest_sessionfinish(self, session) -> None:
        # pytest returns session.exitstatus after this hook; only a passing status is changed.
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.refused:
            return
        terminalreporter.section(f"skips refused ({NO_SKIPS_VAR}=1)", sep="=", red=True)
        for nodeid, reason in self.refused:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line(
            f"{len(self.refused)} test(s) or module(s) skipped for a reason other than "
            f"'{CUDA_SKIP_PREFIX}...': the run fails. Install what they need (bash "
            "scripts/setup_env.sh) or fix the condition.", red=True)


def register(config) -> None:
    """Registers the policy for this run when FASTATTNREG_NO_SKIPS=1 (once per run)."""
    if os.environ.get(NO_SKIPS_VAR, "0") != "1":
        return
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(SkipPolicy(), PLUGIN_NAME)


def pytest_configure(config) -> None:  # used when loaded with `-p skip_policy`
    register(config)
