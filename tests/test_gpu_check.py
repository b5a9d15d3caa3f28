"""scripts/gpu_check.sh without a GPU, and the table it ends with (benchmarks/gpu_table.py).

The GPU path itself (setup, the CUDA test group, the benchmarks) needs a GPU and is not run here.
"""
import csv
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_table, harness
from conftest import ROOT


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "NVIDIA_SMI": str(tmp_path / "no-nvidia-smi")}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "no NVIDIA GPU" in res.stdout, res.stdout
    assert res.stderr == ""


def test_a_named_python_whose_torch_sees_no_gpu_is_refused_before_any_setup(tmp_path):
    # GPU_CHECK_PYTHON is honoured as is: no setup_env.sh run (no "[setup]" line), no build, and
    # the error names the interpreter.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: a stand-in'\n")
    smi.chmod(0o755)
    env = {**os.environ, "NVIDIA_SMI": str(smi), "GPU_CHECK_PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "[setup]" not in res.stdout, res.stdout
    assert f"torch.cuda.is_available() is False in {sys.executable}" in res.stderr, res.stderr


def _bench_row(**kw):
    row = dict.fromkeys(harness.CSV_COLUMNS, "")
    row.update(op="attention", provider="triton", dtype="float16", device="cuda", **kw)
    return row


def test_gpu_table_merges_the_runs_csvs_with_attention_tflops(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, rows in ((a, [_bench_row(mode="fwd", shape="2x3x100x64", median_ms="0.5")]),
                       (b, [_bench_row(mode="fwd+bwd", shape="1x1x1000x100", median_ms="2",
                                       peak_extra_mb="12.5")])):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=harness.CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "gpu-test.csv"
    gpu_table.main(["--out", str(out), str(a), str(b), str(tmp_path / "missing.csv")])
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["shape"] for r in rows] == ["2x3x100x64", "1x1x1000x100"]
    # 4*B*H*N^2*D FLOPs forward, 3.5x that for fwd+bwd, over the median time.
    assert float(rows[0]["attention_tflops"]) == pytest.approx(4 * 6 * 100**2 * 64 / 0.5e-3 / 1e12,
                                                               rel=1e-3)
    assert float(rows[1]["attention_tflops"]) == pytest.approx(3.5 * 4 * 1000**2 * 100 / 2e-3
                                                               / 1e12, rel=1e-3)
    printed = capsys.readouterr().out
    assert "attention_tflops" in printed and "12.5" in printed


def test_gpu_table_refuses_a_run_without_rows(tmp_path):
    with pytest.raises(SystemExit):
        gpu_table.main(["--out", str(tmp_path / "x.csv"), str(tmp_path / "missing.csv")])
