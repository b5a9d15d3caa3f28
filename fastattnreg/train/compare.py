"""`fastattnreg compare`: methods x seeds, one table, one folder.

out/
  runs/<method>-s<seed>/   each run's own folder (metrics.json, log.csv, checkpoint.pt)
  metrics.json             every run's per-epoch history and final metrics, the summary table
  results.csv              one row per run; summary.csv one row per method, with each
                           method's training epoch timed on the fused backend and on the
                           reference path after its runs (backend_timing.py; --time-epochs)
  accuracy.png             test accuracy per epoch, mean over seeds with a +-std band
  attention.png            head-mean CLS attention (last block) and rollout over test images
With --resume, a finished run is read back only when the configuration in its metrics.json
equals the requested one; an unfinished run continues from its checkpoint when the checkpoint's
configuration equals it; any other run starts again from epoch 0 (and stderr says why).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

from ..backend import cpu_numerics
from .checkpoint import (CheckpointError, load_checkpoint, remove_stale_temps, save_json,
                         save_text)
from .dist import DistContext
from .backend_timing import time_backends
from .build import share_link_run
from .plots import plot_accuracy, plot_attention
from .stats import mean_ci, paired_difference, verdict
from .trainer import train_run, versions
from .workers import check_workers, plan_tasks, run_tasks

RUNS = "runs"


def benchmark_name(config) -> str:
    """The data a comparison ran on, as its summary names it ('digits32', 'digits 5-9')."""
    return f"{config.data} {config.classes}" if config.classes else config.data


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, RUNS, f"{method}-s{seed}")


def _finished(folder: str):
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            m = json.load(f)
        return m if m.get("status") == "complete" else None
    except (OSError, ValueError):
        return None


def _changed(recorded: dict, wanted: dict) -> list[str]:
    """The configuration fields whose values differ (missing ones included)."""
    return sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))


def resume_plan(folder: str, config) -> tuple[str, str]:
    """('reuse' | 'continue' | 'restart', reason) for one run of `compare --resume`: a run is
    reused or continued only when its recorded configuration equals `config` and its
    checkpoint loads safely (the plots read it too)."""
    wanted = config.to_dict()
    path = os.path.join(folder, "checkpoint.pt")
    recorded = None
    if os.path.isfile(path):
        try:
            recorded = load_checkpoint(path, f"{folder}: checkpoint")["config"]
        except CheckpointError as exc:
            return "restart", str(exc)
    done = _finished(folder)
    why = ""
    if done is not None:
        diff = _changed(done.get("config", {}), wanted)
        if not diff and recorded is not None and not _changed(recorded, wanted):
            return "reuse", ""
        why = (f"finished earlier with other settings ({', '.join(diff)})" if diff else
               "finished earlier but its checkpoint is missing")
    if recorded is not None:
        diff = _changed(recorded, wanted)
        if not diff:
            return "continue", why
        why = why or f"its checkpoint has other settings ({', '.join(diff)})"
    return "restart", why


def run_compare(configs: dict, methods: list[str], seeds: list[int], out: str, *, resume: bool,
                ctx: DistContext, log, progress: bool, cache_dir: str,
                time_epochs: int = 0, workers: int = 1) -> dict:
    """Trains every (method, seed) of `configs` into out/runs/, times each method's epochs on
    both backends (time_epochs > 0), prints the table and writes the comparison's files.
    workers > 1: in that many processes (workers.py), with the same numbers."""
    check_workers(workers, ctx)
    t_start = time.perf_counter()
    if ctx.is_main and resume:
        remove_stale_temps(out)
    results = {}
    to_train = {}  # (method, seed) -> continue its checkpoint?
    for method in methods:
        for seed in seeds:
            folder = run_dir(out, method, seed)
            plan, why = resume_plan(folder, configs[(method, seed)]) if resume else ("new", "")
            if resume:
                ctx.barrier()  # every rank decides before rank 0 touches the folder
            if plan == "reuse":
                log(f"[compare] {method} seed {seed}: finished earlier, read back")
                results[(method, seed)] = _finished(folder)
                if ctx.is_main:
                    share_link_run(configs[(method, seed)], folder, cache_dir)
                continue
            if plan == "restart" and why:
                log(f"[compare] {method} seed {seed}: {why}; training it again")
            elif plan == "continue" and why:
                log(f"[compare] {method} seed {seed}: {why}; continuing its checkpoint")
            to_train[(method, seed)] = plan == "continue"
    if workers > 1:
        results_in, timings = _run_in_workers(configs, methods, seeds, out, to_train, workers,
                                              cache_dir=cache_dir, time_epochs=time_epochs,
                                              log=log)
        results.update(results_in)
    else:
        for (method, seed), again in to_train.items():
            folder = run_dir(out, method, seed)
            results[(method, seed)] = train_run(
                configs[(method, seed)], folder, resume=again, ctx=ctx, log=log,
                progress=progress, name=f"{method}-s{seed}", cache_dir=cache_dir)
            _share(configs[(method, seed)], folder, cache_dir, ctx, log)
        timings = {}
        for method in methods if time_epochs > 0 else ():
            log(f"[compare] {method}: timing {time_epochs} training epochs on each backend")
            timings[method] = time_backends(configs[(method, seeds[0])], cache_dir=cache_dir,
                                            ctx=ctx, log=log, rounds=time_epochs)
    wall = time.perf_counter() - t_start
    summary = summarise(results, methods, seeds, benchmark_name(configs[(methods[0], seeds[0])]),
                        timings)
    if ctx.is_main:
        first = configs[(methods[0], seeds[0])]
        table = format_table(summary, seeds, first, wall, method_settings(configs, methods, seeds),
                             cpu_numerics() if first.device == "cpu" else None)
        write_outputs(out, configs, results, summary, methods, seeds, wall, table)
        print(table)
    return {"summary": summary, "runs": results}


def _share(config, folder: str, cache_dir: str, ctx: DistContext, log) -> None:
    """A finished `link` run also becomes link_advanced's first run (build.share_link_run)."""
    if ctx.is_main and share_link_run(config, folder, cache_dir):
        log(f"[compare] {config.method} seed {config.seed}: also link_advanced's first run "
            "(cached)")


def _run_in_workers(configs, methods, seeds, out, to_train, workers, *, cache_dir, time_epochs,
                    log) -> tuple[dict, dict]:
    """({(method, seed): metrics} of the runs in to_train, {method: epoch timings}), trained and
    timed in `workers` processes (workers.py)."""
    folders = {key: run_dir(out, *key) for key in configs}
    tasks = plan_tasks(configs, folders, to_train, methods, seeds, time_epochs, cache_dir)
    log(f"[compare] {len(tasks)} tasks ({sum(k.kind == 'guide' for k in tasks)} guides, "
        f"{len(to_train)} runs, {sum(k.kind == 'time' for k in tasks)} timings) in {workers} "
        "worker processes")

    def on_done(key, result):
        if key.kind == "run":
            run = (key.method, key.seed)
            _share(configs[run], folders[run], cache_dir, DistContext(), log)

    done = run_tasks(tasks, workers, on_done)
    results = {(k.method, k.seed): value for k, value in done.items() if k.kind == "run"}
    timings = {k.method: value for k, value in done.items() if k.kind == "time"}
    return results, timings


def reference_of(method: str, methods: list[str]) -> str | None:
    """The row a method is judged against: gta against finetune (the same start without the
    regulariser) where both are compared, every other method against baseline; None for the
    baseline itself or when its reference is not among `methods`."""
    if method == "baseline":
        return None
    parts = method.split("+")
    if "gta" in parts:
        finetune = "+".join("finetune" if p == "gta" else p for p in parts)
        if finetune in methods:
            return finetune
    return "baseline" if "baseline" in methods else None


def _finite(x: float):
    """None for NaN (no interval with one seed): JSON and CSV hold it as null / empty."""
    return None if math.isnan(x) else x


def summarise(results: dict, methods: list[str], seeds: list[int], benchmark: str,
              timings: dict | None = None) -> list[dict]:
    """One row per method: the mean test accuracy over seeds with its 95% interval, and the
    paired difference to the reference row (same seeds) with its interval and verdict;
    `timings` ({method: time_backends(...)}) adds the fused and reference epoch times."""
    timings = timings or {}
    accs = {m: [results[(m, s)]["final"]["test_acc"] for s in seeds] for m in methods}
    rows = []
    for method in methods:
        ci = mean_ci(accs[method])
        ref = reference_of(method, methods)
        delta = paired_difference(accs[method], accs[ref]) if ref else None
        times = [results[(method, s)]["final"]["epoch_time_s"] for s in seeds]
        rows.append({"benchmark": benchmark, "method": method, "reference": ref or "",
                     "seeds": len(seeds), "test_acc_mean": ci.mean, "test_acc_std": ci.std,
                     "ci95_low": _finite(ci.low), "ci95_high": _finite(ci.high),
                     "delta": None if delta is None else delta.mean,
                     "delta_ci95_low": None if delta is None else _finite(delta.low),
                     "delta_ci95_high": None if delta is None else _finite(delta.high),
                     "verdict": "" if delta is None else verdict(delta),
                     "test_accs": accs[method], "epoch_time_s": statistics.mean(times),
                     "eval_split": results[(method, seeds[0])].get("data", {}).get(
                         "eval_split", "test"),
                     "reference_path": results[(method, seeds[0])].get("reference_path", []),
                     "fused_backend": timings.get(method, {}).get("fused_backend", ""),
                     "epoch_time_fused_s": timings.get(method, {}).get("fused_s"),
                     "epoch_time_reference_s": timings.get(method, {}).get("reference_s")})
    return rows


SUMMARY_COLUMNS = ("benchmark", "method", "reference", "seeds", "test_acc_mean", "test_acc_std",
                   "ci95_low", "ci95_high", "delta", "delta_ci95_low", "delta_ci95_high",
                   "verdict", "epoch_time_s", "fused_backend", "epoch_time_fused_s",
                   "epoch_time_reference_s")


def summary_csv(summary: list[dict]) -> str:
    def cell(value):
        if value is None:
            return ""
        return f"{value:.6f}" if isinstance(value, float) else str(value)
    rows = [",".join(SUMMARY_COLUMNS)]
    rows += [",".join(cell(r[c]) for c in SUMMARY_COLUMNS) for r in summary]
    return "\n".join(rows) + "\n"


def method_settings(configs: dict, methods: list[str], seeds: list[int]) -> dict:
    """{setting: {method: value}} for the settings (besides method and seed) whose values differ
    between the methods: the tuned learning rates, compare --method-opt."""
    first = {m: configs[(m, seeds[0])].to_dict() for m in methods}
    keys = [k for k in first[methods[0]] if k not in ("method", "seed")]
    return {k: {m: first[m][k] for m in methods} for k in keys
            if len({repr(first[m][k]) for m in methods}) > 1}


def format_table(summary: list[dict], seeds: list[int], config, wall: float,
                 per_method: dict | None = None, numerics: dict | None = None) -> str:
    split = summary[0]["eval_split"]
    held = f", {config.val_fraction:g} of it held out" if split == "validation" else ""
    head = (f"{split.capitalize()} accuracy on {summary[0]['benchmark']} (train fraction "
            f"{config.train_fraction:g}{held}, {config.epochs} epochs, {len(seeds)} seeds: "
            f"{','.join(map(str, seeds))}); intervals are 95% t intervals over seeds, differences "
            "paired by seed")
    lines = [head, f"{'method':<18} {'mean ± std (%)':>15} {'95% CI':>14}  {'reference':<12}"
                   f"{'difference (pt)':>16} {'95% CI':>15}  {'verdict':<17} {'s/epoch':>7}"
                   f" {'fused s':>8} {'ref. s':>8}"]
    for r in summary:
        ci = ("-" if r["ci95_low"] is None else
              f"[{100 * r['ci95_low']:.1f}, {100 * r['ci95_high']:.1f}]")
        if r["delta"] is None:
            diff = dci = ""
        else:
            diff = f"{100 * r['delta']:+.2f}"
            dci = ("-" if r["delta_ci95_low"] is None else
                   f"[{100 * r['delta_ci95_low']:+.1f}, {100 * r['delta_ci95_high']:+.1f}]")
        note = " (reference path)" if r["reference_path"] else ""
        timed = "".join(" " + ("-" if r[k] is None else f"{r[k]:.3f}").rjust(8)
                        for k in ("epoch_time_fused_s", "epoch_time_reference_s"))
        lines.append(f"{r['method']:<18} {100 * r['test_acc_mean']:>7.2f} ± "
                     f"{100 * r['test_acc_std']:<5.2f} {ci:>14}  {r['reference']:<12}"
                     f"{diff:>16} {dci:>15}  {r['verdict']:<17} {r['epoch_time_s']:>7.2f}{timed}{note}")
    backends = sorted({r["fused_backend"] for r in summary if r["fused_backend"]})
    if backends:
        lines.append(f"fused s / ref. s: the median training epoch on the fused backend "
                     f"({', '.join(backends)}) and on --backend reference, timed in turn after "
                     "the runs")
    for setting, values in (per_method or {}).items():  # e.g. "lr per method: baseline 0.002"
        shown = (f"{m} {v:g}" if isinstance(v, float) else f"{m} {v}" for m, v in values.items())
        lines.append(f"{setting} per method: " + ", ".join(shown))
    if numerics:  # the accuracies are bitwise those of another CPU where this line agrees
        lines.append("CPU instruction sets: " + ", ".join(f"{k} {v}" for k, v in numerics.items()))
    lines.append(f"total wall time {wall:.0f} s (guide training included)")
    return "\n".join(lines)


def write_outputs(out, configs, results, summary, methods, seeds, wall, table: str) -> None:
    """metrics.json, results.csv, summary.csv, table.txt (the printed table), accuracy.png and
    attention.png in `out`."""
    os.makedirs(out, exist_ok=True)
    per_method = method_settings(configs, methods, seeds)
    first = configs[(methods[0], seeds[0])].to_dict()
    shared = {k: v for k, v in first.items() if k not in ("method", "seed") + tuple(per_method)}
    runs = [{"method": m, "seed": s, "folder": run_dir(out, m, s),
             "final": results[(m, s)]["final"], "epochs": results[(m, s)]["epochs"],
             "reference_path": results[(m, s)].get("reference_path", [])}
            for m in methods for s in seeds]
    save_json({"status": "complete", "methods": methods, "seeds": seeds, "config": shared,
               "config_per_method": per_method, "summary": summary, "runs": runs,
               "wall_time_s": wall, "versions": versions()},
              os.path.join(out, "metrics.json"))
    rows = ["method,seed,test_acc,test_loss,best_test_acc,epoch_time_s"]
    rows += [f"{r['method']},{r['seed']},{r['final']['test_acc']:.6f},"
             f"{r['final']['test_loss']:.6f},{r['final']['best_test_acc']:.6f},"
             f"{r['final']['epoch_time_s']:.4f}" for r in runs]
    save_text("\n".join(rows) + "\n", os.path.join(out, "results.csv"))
    save_text(summary_csv(summary), os.path.join(out, "summary.csv"))
    save_text(table + "\n", os.path.join(out, "table.txt"))
    plot_accuracy(runs, methods, os.path.join(out, "accuracy.png"))
    first_seed = {m: os.path.join(run_dir(out, m, seeds[0]), "checkpoint.pt") for m in methods}
    plot_attention(first_seed, configs[(methods[0], seeds[0])], os.path.join(out, "attention.png"))
