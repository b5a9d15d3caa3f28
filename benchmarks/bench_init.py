"""Time and quality of structured_init_ on ViT-Ti widths (192 dims, 3 heads) and more.

For each (preset, grid, method, kernel) the init runs `--repeats` times on a fresh model (seed
0, so every repeat does the same work) and reports the median seconds, the Adam steps taken,
the fit error reached (fit_error: mean over heads and impulse rows of sum_j (P_ij - T_ij)^2)
and the worst head's argmax hit rate on the pseudo input. Rows are appended to
benchmarks/results/structured_init.csv (own columns: these are not op timings).

Run from the repo root: `python -m benchmarks.bench_init`.
"""
from __future__ import annotations

import argparse
import csv
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from benchmarks import harness
from fastattnreg.init import structured_init_
from fastattnreg.models import create_model

DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "structured_init.csv"
# ViT-Ti at 256 px: 16x16 tokens; at 224 px: timm's 14x14.
DEFAULT_CASES = "vit_tiny_patch16_224@256,vit_tiny_patch16_224@224"
COLUMNS = ("preset", "img_size", "grid", "dim", "heads", "method", "kernel_size", "seconds",
           "steps", "error", "min_hit_rate", "threads", "git_sha", "torch_version", "timestamp")


def run_case(preset: str, img_size: int, method: str, kernel_size: int, repeats: int) -> dict:
    seconds, report = [], None
    for _ in range(repeats):
        model = create_model(preset, img_size=img_size, depth=1)  # one layer: same fit cost
        report = structured_init_(model, kernel_size=kernel_size, method=method, seed=0)
        seconds.append(report.seconds)
    c = model.config
    return {"preset": preset, "img_size": img_size, "grid": report.grid_size,
            "dim": c.embed_dim, "heads": c.num_heads, "method": method,
            "kernel_size": kernel_size, "seconds": f"{statistics.median(seconds):.3f}",
            "steps": report.steps, "error": f"{report.error:.4f}",
            "min_hit_rate": f"{min(report.hits):.3f}"}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated preset@img_size (default {DEFAULT_CASES})")
    parser.add_argument("--methods", default="fit,closed_form")
    parser.add_argument("--kernels", default="3,5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    args = parser.parse_args(argv)
    try:
        cases = [(p.split("@")[0], int(p.split("@")[1])) for p in args.cases.split(",") if p]
        methods = harness.parse_list(args.methods, ("fit", "closed_form"), "methods")
        kernels = [int(k) for k in args.kernels.split(",") if k]
    except (ValueError, IndexError) as exc:
        parser.error(f"bad --cases/--methods/--kernels: {exc}")
    rows = []
    common = {"threads": torch.get_num_threads(), "git_sha": harness.git_sha(),
              "torch_version": torch.__version__,
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for preset, img in cases:
        for method in methods:
            for k in kernels:
                row = {**run_case(preset, img, method, k, args.repeats), **common}
                rows.append(row)
                print(f"{preset} @{img} ({row['grid']}x{row['grid']} tokens, C={row['dim']}, "
                      f"H={row['heads']}) {method:11s} k={k}: {row['seconds']} s, "
                      f"{row['steps']} steps, error {row['error']}, min hit rate "
                      f"{row['min_hit_rate']}", flush=True)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"rows appended to {path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
