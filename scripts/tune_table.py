"""Reads the summaries scripts/tune.sh writes (runs/tune/<benchmark>/<method>/<flag>=<value>/
summary.csv) and prints one markdown row per method: each value's validation accuracy (mean
over the seeds) and the value with the highest mean.

    python scripts/tune_table.py [runs/tune]
"""
from __future__ import annotations

import csv
import os
import sys


def read_settings(root: str) -> dict:
    """{(benchmark, method, flag): [(value, mean accuracy, seeds)]}, values in numeric order."""
    out: dict = {}
    for bench in sorted(os.listdir(root)):
        for method in sorted(os.listdir(os.path.join(root, bench))):
            folder = os.path.join(root, bench, method)
            for setting in os.listdir(folder):
                path = os.path.join(folder, setting, "summary.csv")
                if not os.path.isfile(path):
                    continue
                flag, _, value = setting.partition("=")
                with open(path) as f:
                    (row,) = [r for r in csv.DictReader(f) if r["method"] == method]
                out.setdefault((bench, method, flag), []).append(
                    (value, float(row["test_acc_mean"]), int(row["seeds"])))
    for rows in out.values():
        rows.sort(key=lambda r: float(r[0]))
    return out


def main(root: str) -> None:
    print("| benchmark | method | flag | validation accuracy per value (mean of seeds) | chosen |")
    print("|---|---|---|---|---|")
    for (bench, method, flag), rows in read_settings(root).items():
        cells = " / ".join(f"{v}: {100 * acc:.1f}%" for v, acc, _ in rows)
        best = max(rows, key=lambda r: r[1])[0]
        print(f"| {bench} | {method} | --{flag} | {cells} | {best} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "tune"))
