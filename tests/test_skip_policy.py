"""FASTATTNREG_NO_SKIPS=1 (tests/skip_policy.py): a child pytest run on a tiny test file fails
when a test skips for a reason other than needing CUDA, and passes when the only skips are
"needs CUDA" ones; without the variable both pass, as before."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import CUDA_SKIP_REASON, TESTS
from skip_policy import NO_SKIPS_VAR, PLUGIN_NAME

CASES = {
    "cuda_skip": """
        import pytest

        def test_runs():
            assert 1 + 1 == 2

        @pytest.mark.skipif(True, reason={cuda!r})
        def test_cuda_only():
            raise AssertionError("never runs")

        def test_cuda_only_inline():
            pytest.skip({cuda!r})
        """,
    "other_skip": """
        import pytest

        def test_runs():
            assert 1 + 1 == 2

        @pytest.mark.skipif(True, reason="fastattnreg._C is not built")
        def test_needs_the_extension():
            raise AssertionError("never runs")
        """,
    "module_skip": """
        import pytest
        pytest.importorskip("a_module_that_is_not_installed")

        def test_never_collected():
            pass
        """,
    "xfail": """
        import pytest

        @pytest.mark.xfail(reason="known to fail")
        def test_fails():
            raise AssertionError("expected")
        """,
    "failure_and_skip": """
        import pytest

        def test_fails():
            raise AssertionError("a real failure")

        def test_skips():
            pytest.skip("cmake/ctest not found")
        """,
}


def _pytest(tmp_path, case, no_skips):
    """Runs `pytest -p skip_policy` on a folder with the case's file and test_passes.py (one
    passing test, so that a skipped module does not leave the run empty), without a conftest
    (this folder on PYTHONPATH for the plugin); returns the finished process."""
    folder = tmp_path / case
    folder.mkdir()
    (folder / f"test_{case}.py").write_text(
        textwrap.dedent(CASES[case].format(cuda=CUDA_SKIP_REASON)))
    (folder / "test_passes.py").write_text("def test_passes():\n    assert 2 * 2 == 4\n")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop(NO_SKIPS_VAR, None)
    if no_skips:
        env[NO_SKIPS_VAR] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-p", "skip_policy", str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a child pytest run
def test_cuda_skips_pass_under_the_flag(tmp_path):
    res = _pytest(tmp_path, "cuda_skip", no_skips=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed, 2 skipped" in res.stdout and "skips refused" not in res.stdout, res.stdout


@pytest.mark.slow  # a child pytest run
@pytest.mark.parametrize("case,reason", [
    ("other_skip", "fastattnreg._C is not built"),
    ("module_skip", "could not import 'a_module_that_is_not_installed'"),
    ("xfail", "expected failure (xfail): known to fail"),
])
def test_other_skips_fail_the_run_under_the_flag(tmp_path, case, reason):
    res = _pytest(tmp_path, case, no_skips=True)
    assert res.returncode == pytest.ExitCode.TESTS_FAILED, res.stdout + res.stderr
    assert f"skips refused ({NO_SKIPS_VAR}=1)" in res.stdout and reason in res.stdout, res.stdout


@pytest.mark.slow  # a child pytest run
@pytest.mark.parametrize("case", ["cuda_skip", "other_skip", "module_skip", "xfail"])
def test_without_the_flag_skips_pass(tmp_path, case):
    res = _pytest(tmp_path, case, no_skips=False)
    assert res.returncode == 0 and "skips refused" not in res.stdout, res.stdout + res.stderr


@pytest.mark.slow  # a child pytest run
def test_a_failed_run_keeps_its_status_and_no_tests_stays_exit_5(tmp_path):
    res = _pytest(tmp_path, "failure_and_skip", no_skips=True)
    assert res.returncode == pytest.ExitCode.TESTS_FAILED, res.stdout + res.stderr
    assert "cmake/ctest not found" in res.stdout and "1 failed" in res.stdout, res.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                          "skip_policy", str(empty)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(TESTS), NO_SKIPS_VAR: "1"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, res.stdout + res.stderr


def test_this_suite_registers_the_policy_when_the_flag_is_set(request):
    registered = request.config.pluginmanager.has_plugin(PLUGIN_NAME)
    assert registered == (os.environ.get(NO_SKIPS_VAR) == "1")
