"""backend.cpu_numerics(): the instruction sets behind the rounding of CPU float ops, which the
trainer records in metrics.json and compare prints under its table. Each entry must report what
actually runs: the kernels' entry the build's own flags, ATen's and the libraries' entries the
caps set in the environment before torch starts."""
import json
import os
import subprocess
import sys

import pytest

from fastattnreg.train.compare import format_table, summarise
from fastattnreg.train.config import TrainConfig
from conftest import ROOT, requires_cpp

PROBE = "import json, fastattnreg.backend as b; print(json.dumps(b.cpu_numerics()))"
CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _numerics(**env) -> dict:
    """cpu_numerics() in a fresh process (the caps are read once, when torch starts)."""
    clean = {k: v for k, v in os.environ.items() if k not in CAPS}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _setup_flags(simd: str) -> list:
    env = {**os.environ, "FASTATTNREG_PRINT_FLAGS": "1", "FASTATTNREG_SIMD": simd}
    return subprocess.run([sys.executable, "setup.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True, env=env).stdout.split()


@pytest.mark.slow  # a child process
@requires_cpp
def test_kernels_entry_is_the_instruction_set_setup_py_compiles_for():
    # The same FASTATTNREG_SIMD as the build (none in CI), so setup.py prints the build's flags.
    flags = _setup_flags(os.environ.get("FASTATTNREG_SIMD", "auto"))
    expected = ("avx512" if "-DCPU_CAPABILITY_AVX512" in flags else
                "avx2" if "-DCPU_CAPABILITY_AVX2" in flags else "default")
    assert _numerics()["kernels"] == expected


@pytest.mark.slow  # child processes
def test_asking_for_amx_or_avx512_bf16_builds_what_auto_builds():
    """The bf16 kernels' requests must not cap the build that compiles those kernels."""
    auto = _setup_flags("auto")
    assert _setup_flags("amx") == auto and _setup_flags("avx512_bf16") == auto


@pytest.mark.slow  # two child processes
def test_unset_caps_read_auto_and_set_caps_are_reported():
    free = _numerics()
    assert free["MKL_ENABLE_INSTRUCTIONS"] == free["ONEDNN_MAX_CPU_ISA"] == "auto"
    capped = _numerics(ATEN_CPU_CAPABILITY="default", MKL_ENABLE_INSTRUCTIONS="AVX2",
                       ONEDNN_MAX_CPU_ISA="AVX2")
    # "default" is ATen's scalar fallback, which every CPU can run, so the cap always takes.
    assert capped["aten"] == "default"
    assert capped["MKL_ENABLE_INSTRUCTIONS"] == capped["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_compare_table_names_the_instruction_sets():
    results = {("baseline", s): {"final": {"test_acc": 0.5, "epoch_time_s": 0.1}, "data": {}}
               for s in (0, 1)}
    rows = summarise(results, ["baseline"], [0, 1], "digits")
    numerics = {"aten": "avx2", "kernels": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "ONEDNN_MAX_CPU_ISA": "AVX2"}
    table = format_table(rows, [0, 1], TrainConfig(), 1.0, numerics=numerics)
    assert ("CPU instruction sets: aten avx2, kernels avx2, MKL_ENABLE_INSTRUCTIONS AVX2, "
            "ONEDNN_MAX_CPU_ISA AVX2") in table.splitlines()
    assert "CPU instruction sets" not in format_table(rows, [0, 1], TrainConfig(), 1.0)
