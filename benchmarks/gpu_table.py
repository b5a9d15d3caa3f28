"""Merges the CSVs of one GPU run (scripts/gpu_check.sh) into one file and prints its table.

Input: CSVs the bench_<op>.py scripts appended to (harness.CSV_COLUMNS). Output: the same rows
with one column more, attention_tflops: the attention FLOPs of the row's shape (B, H, N, D):
4*B*H*N^2*D for the forward and 2.5x that for the backward (bench_attention's convention), over
the median time. For attention_match and refined_attention it counts the attention part only
(the teacher's logits and the refinement's convolutions are left out), so it compares providers
of one op, not ops with each other.

Run: `python -m benchmarks.gpu_table --out benchmarks/results/gpu-<device>.csv a.csv b.csv`.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

from benchmarks.bench_attention import FLOPS_FACTOR
from benchmarks.harness import CSV_COLUMNS

COLUMNS = (*CSV_COLUMNS, "attention_tflops")
_SHOWN = ("op", "shape", "dtype", "provider", "mode", "median_ms", "attention_tflops",
          "peak_extra_mb")


def attention_tflops(shape: str, mode: str, median_ms: float) -> float:
    """TFLOP/s of attention at shape "BxHxNxD" in `mode` taking median_ms."""
    B, H, N, D = (int(x) for x in shape.split("x"))
    return 4 * B * H * N * N * D * FLOPS_FACTOR[mode] / (median_ms * 1e-3) / 1e12


def merge(paths: Sequence[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if not path.exists():  # a bench whose every provider failed writes nothing
            continue
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                tflops = attention_tflops(row["shape"], row["mode"], float(row["median_ms"]))
                rows.append({**row, "attention_tflops": f"{tflops:.4g}"})
    return rows


def format_table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _SHOWN}
    lines = ["  ".join(c.ljust(widths[c]) for c in _SHOWN)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in _SHOWN) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="merged CSV to write")
    parser.add_argument("csvs", type=Path, nargs="+", help="the run's bench CSVs")
    args = parser.parse_args(argv)
    rows = merge(args.csvs)
    if not rows:
        parser.error("no benchmark rows in " + ", ".join(map(str, args.csvs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    print(f"\n{len(rows)} rows written to {args.out}", flush=True)
    return rows


if __name__ == "__main__":
    main()
