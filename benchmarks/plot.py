"""Draws a benchmark results CSV as a PNG: one panel per shape, one bar per provider.

Only rows of the newest git sha are drawn (the sha of the most recent row), so that a plot
shows one state of the code; if a (shape, dtype, provider) was run several times at that sha,
its latest row wins. Bars are median times with p20-p80 error bars.

    python -m benchmarks.plot [--csv benchmarks/results/attention.csv] [--out ....png] [--mode fwd+bwd]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Sequence[dict], mode: str) -> list[dict]:
    """Rows of `mode` at the newest git sha, one per (shape, dtype, provider): the latest."""
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return []
    newest_sha = max(rows, key=lambda r: r["timestamp"])["git_sha"]
    latest: dict[tuple, dict] = {}
    for r in sorted((r for r in rows if r["git_sha"] == newest_sha), key=lambda r: r["timestamp"]):
        latest[(r["shape"], r["dtype"], r["provider"])] = r
    return list(latest.values())


def _ordered(values) -> list:
    """Unique values in first-seen order (keeps the CSV's provider and shape order)."""
    return list(dict.fromkeys(values))


def plot(rows: Sequence[dict], out: Path, mode: str, title: str = "") -> Path:
    """Draws the panels and writes `out`; rows must already be filtered by latest_rows."""
    shapes = _ordered(r["shape"] for r in rows)
    dtypes = _ordered(r["dtype"] for r in rows)
    providers = _ordered(r["provider"] for r in rows)
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(4.5 * len(shapes), 5), 4.2),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, shape in zip(axes[0], shapes):
        for i, provider in enumerate(providers):
            xs, med, lo, hi = [], [], [], []
            for g, dtype in enumerate(dtypes):
                match = [r for r in rows if (r["shape"], r["dtype"], r["provider"])
                         == (shape, dtype, provider)]
                if not match:
                    continue
                r = match[0]
                m = float(r["median_ms"])
                xs.append(g + (i - (len(providers) - 1) / 2) * width)
                med.append(m)
                lo.append(m - float(r["p20_ms"]))
                hi.append(float(r["p80_ms"]) - m)
            if xs:
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, color=colors[provider],
                       label=provider)
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_title(shape)
        ax.set_ylabel(f"{mode} median ms (p20-p80)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(providers), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=RESULTS / "attention.csv")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: the CSV's path with .png)")
    parser.add_argument("--mode", default="fwd+bwd", choices=("fwd", "bwd", "fwd+bwd"))
    args = parser.parse_args(argv)
    rows = latest_rows(read_rows(args.csv), args.mode)
    if not rows:
        parser.error(f"no {args.mode} rows in {args.csv}")
    first = rows[0]
    title = (f"{first['op']} {args.mode} - git {first['git_sha']}, {first['device']}, "
             f"{first['threads']} threads, torch {first['torch_version']}")
    out = plot(rows, args.out or args.csv.with_suffix(".png"), args.mode, title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
