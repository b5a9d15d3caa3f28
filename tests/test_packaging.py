"""Installing as people do: `pip install .` and sdists.

* Without torch (pip's default build isolation runs setup.py in a throw-away environment that has
  setuptools but not the installed torch) setup.py stops at once with one line that says so and
  names the command that works. Checked in a real interpreter without torch: a venv made with
  --without-pip, plain and under pip itself (`pip --python VENV_PYTHON install`, offline, with
  this venv's setuptools made importable there, as pip's isolated build env does).
* The sdist builds a wheel against the installed torch (`pip wheel --no-build-isolation`), and
  that wheel, installed into a folder of its own, imports with the C++ kernels from outside the
  repository (its compiles are ccache hits where test_cpp_unit.py compiled the same files).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test runs setup.py or pip in child processes

MESSAGE_START = "fastattnreg: the build needs the installed torch"
WORKING_COMMAND = "pip install --no-build-isolation ."


def _run(cmd, timeout, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kw)


@pytest.fixture(scope="module")
def torchless_python(tmp_path_factory):
    """A venv's python with neither torch nor pip nor setuptools (--without-pip; no system or
    user site-packages)."""
    venv = tmp_path_factory.mktemp("torchless") / "venv"
    res = _run([sys.executable, "-m", "venv", "--without-pip", venv], 120)
    assert res.returncode == 0, res.stderr
    python = venv / "bin" / "python"
    res = _run([python, "-c", "import torch"], 60)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr, res.stderr
    return python


@pytest.fixture(scope="module")
def setuptools_only(tmp_path_factory):
    """A folder holding links to this venv's setuptools (and the modules it imports at start-up),
    nothing else: on PYTHONPATH it gives an interpreter setuptools but not torch."""
    folder = tmp_path_factory.mktemp("setuptools_only")
    assert importlib.util.find_spec("setuptools") is not None, "setuptools is not installed"
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):  # the last two: older ones
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            (folder / name).symlink_to(list(spec.submodule_search_locations)[0])
    return folder


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def _no_torch_line(torchless_python):
    """setup.py's output in an interpreter without torch: exit status 1, one line on stderr."""
    res = _run([torchless_python, "setup.py", "bdist_wheel"], 120, cwd=ROOT, env=_env())
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_setup_py_without_torch_prints_one_line(torchless_python):
    line = _no_torch_line(torchless_python)
    assert line.startswith(MESSAGE_START) and WORKING_COMMAND in line, line


def test_pip_install_without_torch_stops_with_the_one_line(torchless_python, setuptools_only):
    """What pip shows: its own wrapper ("Getting requirements to build wheel" or "Preparing
    metadata ... did not run successfully", "exit code: 1", "[1 lines of output]", the subprocess
    note) around our line, the only output of the build step; no traceback."""
    res = _run([sys.executable, "-m", "pip", "--python", torchless_python, "install", "--no-index",
                "--no-deps", "--no-build-isolation", "--no-cache-dir", ROOT], 300,
               cwd=ROOT.parent, env=_env(PYTHONPATH=str(setuptools_only)))
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert _no_torch_line(torchless_python) in out and "[1 lines of output]" in out, out
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out


def _copy_checkout(dest):
    """Copies the files git knows here (tracked, and untracked but not ignored) to dest: a clean
    clone's view, without build outputs or an old *.egg-info, whose SOURCES.txt setuptools would
    merge into a new sdist's file list."""
    res = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
               60)
    assert res.returncode == 0, f"this test needs a git checkout: {res.stderr}"
    for rel in filter(None, res.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_sdist_builds_a_wheel_that_imports_with_the_cpp_kernels(tmp_path):
    # The sdist of a clean copy, by setuptools' PEP 517 hook (what `python -m build --sdist` calls).
    checkout, dist = tmp_path / "checkout", tmp_path / "dist"
    _copy_checkout(checkout)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    res = _run([sys.executable, "-c", code], 300, cwd=checkout, env=_env())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    sdist = dist / res.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "src", filter="data")
    top = sdist.name.removesuffix(".tar.gz")  # fastattnreg-VERSION
    assert f"{top}/csrc/cpu/attention_kernels.h" in names and f"{top}/setup.py" in names
    assert not any(n.endswith(".so") for n in names)

    # The wheel, against this venv's torch, offline. The venv's bin folder first on PATH: the
    # compiles go through its ccache, whose base dir (the unpacked sdist) makes the paths under
    # it relative, so the editable build's compiles of the same files (scripts/setup_env.sh, with
    # the venv at .venv in the checkout) serve them. The venv is reached through a link at the
    # same place, src/.venv, so that torch's headers get the same relative names as there (a
    # file missing from the sdist still fails: ccache then runs the compiler).
    wheels, src = tmp_path / "wheels", tmp_path / "src" / top
    python = Path(sys.executable)
    if python.is_relative_to(sys.prefix):
        (src / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        python = src / ".venv" / python.relative_to(sys.prefix)
    path = os.pathsep.join([str(python.parent), os.environ.get("PATH", "")])
    res = _run([python, "-m", "pip", "wheel", "--no-index", "--no-deps",
                "--no-build-isolation", "--no-cache-dir", "-w", wheels, src],
               1800, cwd=tmp_path, env=_env(PATH=path, CCACHE_BASEDIR=str(src)))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    (wheel,) = wheels.glob("fastattnreg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.startswith("fastattnreg/_C") and n.endswith(".so") for n in zf.namelist())

    # Installed into a folder of its own and imported from outside the repository.
    target = tmp_path / "site"
    res = _run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                "--no-cache-dir", "--target", target, wheel], 300, cwd=tmp_path, env=_env())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    smoke = textwrap.dedent(
        f"""
        import torch, fastattnreg
        assert fastattnreg.__file__.startswith({str(target)!r}), fastattnreg.__file__
        assert fastattnreg.cpp_available()
        q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64) for _ in range(3))
        out, maps = fastattnreg.attention(q, k, v, export="cls", backend="cpp")
        ref, ref_maps = fastattnreg.attention_ref(q, k, v, export="cls")
        assert (out - ref).abs().max() < 1e-12 and (maps - ref_maps).abs().max() < 1e-12
        print("OK", fastattnreg.__file__)
        """
    )
    res = _run([sys.executable, "-c", smoke], 300, cwd=tmp_path,
               env=_env(PYTHONPATH=str(target), FASTATTNREG_REQUIRE_CPP="1"))
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-4000:] + res.stderr[-4000:]
