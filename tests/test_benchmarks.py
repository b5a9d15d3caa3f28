"""Smoke tests of the benchmark harness, every benchmark (attention, match, refiner, ViT step,
init) and plot.py on a tiny shape.

It checks plumbing only (CSV columns, one row per provider x mode, memory column, PNG written);
speed and memory are never asserted (no timed assertions in tests). Everything is written
under tmp_path, never into benchmarks/results/.
"""
import csv
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, OpDtypes, requires_cpp

# `benchmarks` is a repo-root folder, not an installed package: make it importable under a bare
# `pytest` too (python -m pytest already puts the current directory first).
sys.path.insert(0, str(ROOT))
from benchmarks import (  # noqa: E402
    bench_attention, bench_init, bench_match, bench_refiner, bench_vit_step, harness,
    init_locality,
)

# Each test runs a benchmark end to end, peak memory measured in fresh processes.
pytestmark = [requires_cpp, pytest.mark.slow]


def read_rows(csv_path: Path) -> list[dict]:
    """The rows of a benchmark CSV, after checking its header is the harness's."""
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == harness.CSV_COLUMNS
    return rows


def assert_timed(row: dict, shape: str, measured: bool) -> None:
    """A row of `shape` in float32 with ordered percentiles, and a peak-memory entry exactly
    when this provider and mode were measured."""
    assert row["shape"] == shape and row["dtype"] == "float32"
    assert 0 < float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert (row["peak_extra_mb"] != "") == measured


def test_bench_attention_writes_csv_and_plot(tmp_path, capsys):
    csv_path = tmp_path / "a.csv"
    bench_attention.main([
        "--shapes", "1x2x17x16", "--repeats", "2", "--warmup", "1",
        "--memory-providers", "sdpa", "--csv", str(csv_path),
    ])
    printed = capsys.readouterr().out
    assert "median ms" in printed and "targets 1x2x17x16" in printed
    assert "TFLOP/s 1x2x17x16" in printed and "run on CUDA only" in printed

    rows = read_rows(csv_path)
    providers = bench_attention.default_providers(torch.device("cpu"))  # not CUDA-only ones
    got = sorted((r["provider"], r["mode"]) for r in rows)
    assert got == sorted((p, m) for p in providers for m in harness.MODES)
    for r in rows:
        assert r["op"] == "attention"
        assert_timed(r, "1x2x17x16", r["provider"] == "sdpa" and r["mode"] == "fwd+bwd")
    float(next(r for r in rows if r["peak_extra_mb"])["peak_extra_mb"])  # a number

    pytest.importorskip("matplotlib")  # the optional "bench" dependency
    from benchmarks import plot  # imports matplotlib, an optional dependency

    png = tmp_path / "a.png"
    plot.main(["--csv", str(csv_path), "--out", str(png)])
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_match_writes_csv_and_prints_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(bench_match.ENV_VAR, raising=False)
    csv_path = tmp_path / "m.csv"
    bench_match.main([
        "--shapes", "1x2x17x16", "--repeats", "2", "--warmup", "1", "--kinds", "kl,mse_logits",
        "--memory-providers", "naive", "--csv", str(csv_path),
    ])
    printed = capsys.readouterr().out
    assert "median ms" in printed
    assert "targets kl rows=all 1x2x17x16" in printed and "targets mse_logits rows=all" in printed
    assert bench_match.ENV_VAR not in os.environ  # restored after the run

    rows = read_rows(csv_path)
    got = sorted((r["op"], r["provider"], r["mode"]) for r in rows)
    assert got == sorted((f"attention_match_{kind}", p, m) for kind in ("kl", "mse_logits")
                         for p in bench_match.DEVICE_PROVIDERS["cpu"].split(",")
                         for m in harness.MODES)
    for r in rows:
        assert_timed(r, "1x2x17x16", r["provider"] == "naive" and r["mode"] == "fwd+bwd")


def test_bench_refiner_writes_csv_and_prints_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(bench_refiner.ENV_VAR, raising=False)
    csv_path = tmp_path / "r.csv"
    results = bench_refiner.main([
        "--shapes", "1x2x17x16", "--repeats", "2", "--warmup", "1",
        "--memory-providers", "naive", "--csv", str(csv_path),
    ])
    printed = capsys.readouterr().out
    assert "median ms" in printed
    assert "targets train 1x2x17x16 fwd+bwd: fastattnreg/naive time" in printed
    assert "fastattnreg/naive peak extra memory" in printed
    assert bench_refiner.ENV_VAR not in os.environ  # restored after the run
    assert sorted(results) == ["eval", "train"]

    rows = read_rows(csv_path)
    got = sorted((r["op"], r["provider"], r["mode"]) for r in rows)
    want = [(f"refined_attention_{setting}", p, m)
            for setting, modes in bench_refiner.SETTINGS.items()
            for p in bench_refiner.DEVICE_PROVIDERS["cpu"].split(",") for m in modes]
    assert got == sorted(want)
    for r in rows:
        measured = r["provider"] == "naive" and r["mode"] == "fwd+bwd"
        assert_timed(r, "1x2x17x16", measured)
    with pytest.raises(SystemExit):
        bench_refiner.main(["--shapes", "2x17x16", "--csv", str(csv_path)])


def test_memory_subprocess_sees_allocations_despite_a_big_parent():
    """The child must report its own peak even when this process is much bigger than it.

    (Linux copies a parent's peak RSS into a forked child's ru_maxrss, which once made every
    measurement +0 MB.) Naive attention at (8, 6, 197, 64) keeps several 7.4 MB (B,H,N,N)
    tensors alive at once, so anything below one of them means the measurement is broken.
    """
    ballast = torch.ones(128 * 2**20)  # 512 MB resident in the parent while the child runs
    ballast.add_(1)
    mb, error = harness.measure_peak_extra_mb(
        "benchmarks.bench_attention", "naive", (8, 6, 197, 64), (1, 6, 17, 64),
        torch.float32, torch.device("cpu"), threads=torch.get_num_threads())
    del ballast
    assert error == ""
    assert mb > 7.4


def test_bench_vit_step_writes_csv_and_ratios(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(bench_vit_step.ENV_VAR, raising=False)
    csv_path = tmp_path / "v.csv"
    bench_vit_step.main([
        "--presets", "vit_tiny_patch2_8:2", "--repeats", "2", "--warmup", "1",
        "--memory-providers", "cpp", "--csv", str(csv_path),
    ])
    printed = capsys.readouterr().out
    assert "median ms" in printed and "ratios vit_tiny_patch2_8 batch 2 fwd+bwd: cpp/timm" in printed
    assert bench_vit_step.ENV_VAR not in os.environ  # restored after the run

    rows = read_rows(csv_path)
    got = sorted((r["op"], r["provider"], r["mode"]) for r in rows)
    assert got == sorted(("vit_step_vit_tiny_patch2_8", p, m) for p in bench_vit_step.PROVIDERS
                         for m in ("fwd", "fwd+bwd"))
    for r in rows:
        assert_timed(r, "2", r["provider"] == "cpp" and r["mode"] == "fwd+bwd")
    with pytest.raises(SystemExit):
        bench_vit_step.main(["--presets", "vit_huge:2", "--csv", str(csv_path)])


def test_bench_vit_step_autocast_bf16_runs_the_attention_in_bf16(tmp_path, capsys):
    """--precision bf16: the CSV's op names the precision and the variable is restored after
    the run; the step's forward runs under autocast, so the fused op sees bf16 q, k, v."""
    csv_path = tmp_path / "v.csv"
    bench_vit_step.main(["--presets", "vit_tiny_patch2_8:2", "--repeats", "1", "--warmup", "1",
                         "--providers", "cpp,timm", "--modes", "fwd+bwd", "--no-memory",
                         "--precision", "bf16", "--csv", str(csv_path)])
    assert "ratios vit_tiny_patch2_8 batch 2 fwd+bwd: cpp/timm" in capsys.readouterr().out
    assert bench_vit_step.PRECISION_VAR not in os.environ
    assert {r["op"] for r in read_rows(csv_path)} == {"vit_step_vit_tiny_patch2_8_autocast_bf16"}
    with pytest.raises(SystemExit):
        bench_vit_step.main(["--presets", "vit_tiny_patch2_8:2", "--precision", "bf16",
                             "--dtype", "bfloat16", "--csv", str(csv_path)])

    config = bench_vit_step.preset_config("vit_tiny_patch2_8")
    cpu = torch.device("cpu")
    model, opt = bench_vit_step.prepared_model("cpp", config, torch.float32, cpu)
    case = bench_vit_step.step_case(model, opt, config, 2, torch.float32, cpu, "bf16")
    with OpDtypes() as spy:
        case.backward(case.forward())
    assert spy.dtypes("attention_fwd", 0) == {torch.bfloat16}
    assert spy.dtypes("attention_bwd", 1) == {torch.bfloat16}


def test_bench_init_writes_csv(tmp_path, capsys):
    csv_path = tmp_path / "s.csv"
    rows = bench_init.main(["--cases", "vit_tiny_patch2_8@8", "--kernels", "3", "--repeats", "1",
                            "--csv", str(csv_path)])
    assert "vit_tiny_patch2_8 @8 (4x4 tokens, C=64, H=4) fit" in capsys.readouterr().out
    with csv_path.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["method"] for r in written] == ["fit", "closed_form"] == [r["method"] for r in rows]
    for r in written:
        assert r["grid"] == "4" and float(r["seconds"]) > 0 and float(r["min_hit_rate"]) >= 0.95


def test_init_locality_splits_each_patch_query_attention(capsys):
    pytest.importorskip("sklearn")
    rows = {(r["method"], r["pos_embed"]): r for r in init_locality.main(["--seeds", "1"])}
    assert "| mimetic | learn |" in capsys.readouterr().out
    for r in rows.values():  # the four parts are a patch query's whole attention
        assert r["self"] + r["neighbours"] + r["farther"] + r["cls"] == pytest.approx(1, abs=1e-5)
    uniform_neighbours = 84 / 16 / 17  # 84 (query, neighbour) pairs on the 4x4 grid, 17 keys
    base = rows[("baseline", "learn")]
    assert base["neighbours"] == pytest.approx(uniform_neighbours, abs=0.02)  # no prior
    assert rows[("mimetic", "learn")]["self"] > 3 * base["self"]  # q k^T ~ I: itself first
    assert rows[("structured", "sincos")]["neighbours"] > 1.5 * uniform_neighbours


def test_init_locality_class_token_rows_peak_after_the_first_block_under_structured_init(capsys):
    pytest.importorskip("sklearn")
    rows = {(r["data"], r["method"]): r for r in init_locality.main(["--seeds", "1",
                                                                      "--class-token"])}
    assert "| digits32 | structured |" in capsys.readouterr().out
    for data, tokens in (("digits", 17), ("digits32", 65)):
        base, structured = rows[(data, "baseline")], rows[(data, "structured")]
        assert base["tokens"] == structured["tokens"] == tokens
        assert max(base["peaks"]) < 1.5 / tokens  # a near-uniform row: it pools the image
        # the first block's class query is zero (zero embedding row): a uniform row; later
        # blocks' class queries carry content through the fitted W_q and peak
        assert structured["peaks"][0] < 1.5 / tokens
        assert min(structured["peaks"][1:]) > 0.3
