"""A small timing and peak-memory harness shared by every benchmarks/bench_<op>.py.

Vocabulary:
  * A `Provider` is one implementation of an op under test: a name and a `make(shape, dtype,
    device) -> Case` function. `make` allocates the inputs (and the random upstream gradients)
    once; the `Case` it returns can then run the forward and the backward as often as needed.
  * Modes: "fwd" (forward under torch.no_grad), "bwd" (backward only: every repeat builds a fresh
    forward graph untimed and times only the backward call) and "fwd+bwd".
  * Timing: warm-up repeats, then N timed repeats with time.perf_counter; median, p20 and p80 in
    ms. Providers and modes are interleaved round-robin inside every repeat, so that a noisy
    neighbour on a shared machine slows all providers alike instead of one of them.
  * Peak extra memory: measured for "fwd+bwd" in a fresh subprocess per provider
    (`python -m benchmarks.harness --memory ...`), because ru_maxrss is a process-wide high-water
    mark that never goes down: one process can only measure one thing.

A bench module exposes its providers as a module-level dict `PROVIDERS` (name -> Provider) so
that the memory subprocess can find them by importing the module by name.
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import os
from contextlib import contextmanager
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

MODES = ("fwd", "bwd", "fwd+bwd")
MEMORY_MODE = "fwd+bwd"
CSV_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "device", "threads", "git_sha", "torch_version",
    "median_ms", "p20_ms", "p80_ms", "peak_extra_mb", "timestamp",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "float16": torch.float16}
REPO_ROOT = Path(__file__).resolve().parent.parent
# Providers whose names get a ratio column in the table when they ran.
REFERENCE_PROVIDERS = ("naive", "sdpa")

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- providers and cases


@dataclass(frozen=True)
class Case:
    """One provider, prepared at one shape: inputs already allocated.

    forward() runs the op and returns its outputs (with their autograd graph when grad is on);
    backward(outputs) runs the backward pass from the outputs of one forward() call.
    """

    forward: Callable[[], Any]
    backward: Callable[[Any], Any]


@dataclass(frozen=True)
class Provider:
    """A named implementation of an op; make(shape, dtype, device) allocates its inputs."""

    name: str
    make: Callable[[Shape, torch.dtype, torch.device], Case]



@contextmanager
def env_setting(name: str, value: str):
    """Sets environment variable `name` for this process and the memory subprocesses it starts
    (which find a benchmark's setting there), restoring the old value afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

def autograd_case(fn: Callable[..., Any], inputs: Sequence[torch.Tensor],
                  grad_outputs: Sequence[torch.Tensor]) -> Case:
    """A Case for `fn(*inputs)` whose backward feeds `grad_outputs` to the outputs of fn.

    The upstream gradients are passed in (not derived from a trial forward) so that nothing
    shape-sized is computed while a memory baseline is being set. torch.autograd.grad returns
    fresh gradients instead of accumulating into .grad, so every repeat does the same work.
    """
    inputs = tuple(inputs)
    grad_outputs = tuple(grad_outputs)

    def forward():
        return fn(*inputs)

    def backward(outputs):
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if len(outputs) != len(grad_outputs):
            raise ValueError(f"got {len(outputs)} outputs but {len(grad_outputs)} upstream grads")
        return torch.autograd.grad(tuple(outputs), inputs, grad_outputs)

    return Case(forward, backward)


# --------------------------------------------------------------------------------------- parsing


def parse_shape(text: str) -> Shape:
    """'32x6x197x64' -> (32, 6, 197, 64)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 32x6x197x64; got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"shape dimensions must be positive; got {text!r}")
    return shape


def parse_shapes(text: str) -> list[Shape]:
    """'32x6x197x64,64x3x65x64' -> [(32, 6, 197, 64), (64, 3, 65, 64)]."""
    return [parse_shape(part) for part in text.split(",") if part.strip()]


def format_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of names, each checked against `allowed`, order kept."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


# ---------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(case: Case, mode: str, device: torch.device) -> float:
    """Seconds for one call of `mode`; the forward of "bwd" runs before the clock starts."""
    if mode == "fwd":
        with torch.no_grad():
            start = time.perf_counter()
            case.forward()
            _sync(device)
            return time.perf_counter() - start
    if mode == "bwd":
        outputs = case.forward()
        _sync(device)
        start = time.perf_counter()
        case.backward(outputs)
        _sync(device)
        return time.perf_counter() - start
    if mode == "fwd+bwd":
        start = time.perf_counter()
        case.backward(case.forward())
        _sync(device)
        return time.perf_counter() - start
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def time_cases(cases: dict[str, Case], modes: Sequence[str], repeats: int, warmup: int,
               device: torch.device) -> tuple[dict[tuple[str, str], list[float]], dict[str, str]]:
    """Times every (provider, mode) pair, interleaved round-robin within each repeat.

    The start of the round-robin rotates with every repeat so that no provider always runs
    right after the same neighbour (caches, frequency, allocator state). A provider that raises
    is dropped with its error message instead of ending the whole benchmark.
    Returns ({(provider, mode): [seconds, ...]}, {provider: error}).
    """
    tasks = [(name, mode) for mode in modes for name in cases]
    times: dict[tuple[str, str], list[float]] = {task: [] for task in tasks}
    errors: dict[str, str] = {}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one timed call would bill one provider for everyone
    try:
        for rep in range(warmup + repeats):
            shift = rep % len(tasks) if tasks else 0
            for name, mode in tasks[shift:] + tasks[:shift]:
                if name in errors:
                    continue
                try:
                    seconds = time_once(cases[name], mode, device)
                except Exception as exc:  # noqa: BLE001 - reported, provider dropped
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    continue
                if rep >= warmup:
                    times[(name, mode)].append(seconds)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {t: s for t, s in times.items() if t[0] not in errors}, errors


def summarize_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    p20, median, p80 = np.percentile(np.asarray(seconds) * 1e3, [20, 50, 80])
    return float(median), float(p20), float(p80)


# ---------------------------------------------------------------------------------------- memory


def _max_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    VmHWM (the high-water mark of this process's own address space) where /proc exists, else
    ru_maxrss. ru_maxrss alone is wrong in a subprocess: Linux carries the parent's peak RSS
    into a forked-and-exec'd child's ru_maxrss, so a child started by a big benchmark process
    starts above anything it will allocate and reports +0 MB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    # Linux reports ru_maxrss in KiB (macOS in bytes; this harness targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_extra_mb_here(provider: Provider, shape: Shape, warmup_shape: Shape,
                       dtype: torch.dtype, device: torch.device) -> float:
    """Peak extra memory (MB) of one forward+backward, measured in *this* process.

    Meaningful only in a fresh process (see measure_peak_extra_mb). The inputs at the real
    shape are allocated first and a small warm-up loads libraries, kernels and thread pools, so
    that the baseline already contains all of them and only the op's own working memory counts.
    """
    torch.manual_seed(0)
    case = provider.make(shape, dtype, device)
    small = provider.make(warmup_shape, dtype, device)
    small.backward(small.forward())
    del small
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.backward(case.forward())
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _max_rss_mb()
    case.backward(case.forward())
    return _max_rss_mb() - base


def measure_peak_extra_mb(registry: str, provider: str, shape: Shape, warmup_shape: Shape,
                          dtype: torch.dtype, device: torch.device, threads: int,
                          timeout_s: float = 300.0) -> tuple[float | None, str]:
    """Runs peak_extra_mb_here in a fresh `python -m benchmarks.harness --memory` subprocess.

    `registry` is the importable module that holds PROVIDERS. Returns (MB or None, error).
    """
    cmd = [
        sys.executable, "-m", "benchmarks.harness", "--memory",
        "--registry", registry, "--provider", provider,
        "--shape", format_shape(shape), "--warmup-shape", format_shape(warmup_shape),
        "--dtype", dtype_name(dtype), "--device", str(device), "--threads", str(threads),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_extra_mb"], ""
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit code {proc.returncode}: {tail}"


def _memory_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the memory subprocess: prints one JSON line {"peak_extra_mb": ...}."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness --memory")
    parser.add_argument("--memory", action="store_true", required=True)
    parser.add_argument("--registry", required=True, help="module holding PROVIDERS")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--shape", type=parse_shape, required=True)
    parser.add_argument("--warmup-shape", type=parse_shape, required=True)
    parser.add_argument("--dtype", type=parse_dtype, default=torch.float32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    provider = importlib.import_module(args.registry).PROVIDERS[args.provider]
    mb = peak_extra_mb_here(provider, args.shape, args.warmup_shape, args.dtype,
                            torch.device(args.device))
    print(json.dumps({"peak_extra_mb": mb}), flush=True)


# --------------------------------------------------------------------------- results and reports


@dataclass
class Result:
    """One (provider, mode) measurement at one shape."""

    provider: str
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mb: float | None = None


def git_sha() -> str:
    """Short sha of HEAD, or "unknown" (no git, no commit yet)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "-"
    return f"{value / reference:.2f}"


def target_parts(targets, results: Sequence[Result], *, digits: int = 2) -> list[str]:
    """One phrase per fwd+bwd target (numerator, denominator, Result field, limit): the measured
    ratio and whether it holds, or why there is none. Reported, never asserted."""
    by_name = {r.provider: r for r in results if r.mode == "fwd+bwd"}
    parts = []
    for num, den, field, limit in targets:
        a, b = by_name.get(num), by_name.get(den)
        x = getattr(a, field) if a else None
        y = getattr(b, field) if b else None
        what = "time" if field == "median_ms" else "peak extra memory"
        if x is None or y is None:
            parts.append(f"{num}/{den} {what} target <= {limit}: not measured")
            continue
        if y <= 0:  # tiny shapes: the reference's peak is below the measurement's resolution
            parts.append(f"{num}/{den} {what} target <= {limit}: no ratio ({den} {y:+.1f})")
            continue
        ratio = x / y
        parts.append(f"{num}/{den} {what} {ratio:.{digits}f} (target <= {limit}: "
                     f"{'met' if ratio <= limit else 'NOT met'})")
    return parts


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table; ratio columns only for reference providers that ran."""
    names = {r.provider for r in results}
    refs = [ref for ref in REFERENCE_PROVIDERS if ref in names]
    with_memory = any(r.peak_extra_mb is not None for r in results)
    by_key = {(r.provider, r.mode): r for r in results}
    header = ["provider", "mode", "median ms", "p20 ms", "p80 ms"]
    header += [f"t/{ref}" for ref in refs]
    if with_memory:
        header += ["peak +MB"] + [f"mem/{ref}" for ref in refs]
    rows = []
    for r in results:
        row = [r.provider, r.mode, f"{r.median_ms:.2f}", f"{r.p20_ms:.2f}", f"{r.p80_ms:.2f}"]
        for ref in refs:
            other = by_key.get((ref, r.mode))
            row.append(_ratio(r.median_ms, other.median_ms if other else None))
        if with_memory:
            row.append("-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}")
            for ref in refs:
                other = by_key.get((ref, r.mode))
                row.append(_ratio(r.peak_extra_mb, other.peak_extra_mb if other else None))
        rows.append(row)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    left = 2  # provider and mode are text: left-aligned; numbers right-aligned

    def fmt(row):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def append_csv(path: Path, op: str, shape: Shape, dtype: torch.dtype, device: torch.device,
               results: Sequence[Result]) -> None:
    """Appends one row per result; writes the header first when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    common = {
        "op": op, "shape": format_shape(shape), "dtype": dtype_name(dtype),
        "device": str(device), "threads": torch.get_num_threads(), "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow({
                **common, "provider": r.provider, "mode": r.mode,
                "median_ms": f"{r.median_ms:.4f}", "p20_ms": f"{r.p20_ms:.4f}",
                "p80_ms": f"{r.p80_ms:.4f}",
                "peak_extra_mb": "" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}",
            })


# ------------------------------------------------------------------------------------ one run


def _batch_one(shape: Shape) -> Shape:
    """Default warm-up shape for the memory baseline: the real shape with batch 1."""
    return (1, *shape[1:])


def attention_warmup_shape(shape: Shape) -> Shape:
    """Warm-up shape of the (B, H, N, D) attention ops' memory subprocess: the same heads and
    head dim (the same kernel paths), one image, at most 17 tokens."""
    B, H, N, D = shape
    return (1, H, min(N, 17), D)


def run_shape(op: str, providers: Sequence[Provider], shape: Shape, *, dtype: torch.dtype,
              device: torch.device, modes: Sequence[str], repeats: int, warmup: int,
              registry: str, memory_providers: Iterable[str] = (),
              warmup_shape: Callable[[Shape], Shape] = _batch_one) -> list[Result]:
    """Times all providers at one shape, then measures peak memory; returns the results.

    Memory runs after timing and after the timed inputs are freed, so that the subprocesses
    neither disturb the timings nor compete with them for the two cores.
    """
    cases: dict[str, Case] = {}
    failed: dict[str, str] = {}
    for provider in providers:
        torch.manual_seed(0)  # every provider gets the same inputs
        try:
            cases[provider.name] = provider.make(shape, dtype, device)
        except Exception as exc:  # noqa: BLE001 - reported, provider skipped
            failed[provider.name] = f"{type(exc).__name__}: {exc}"
    times, errors = time_cases(cases, modes, repeats, warmup, device)
    failed.update(errors)
    del cases
    gc.collect()
    for name, error in failed.items():
        print(f"  skipped {name}: {error}", flush=True)

    results = [Result(name, mode, *summarize_ms(secs)) for (name, mode), secs in times.items()]
    ran = {r.provider for r in results}
    if MEMORY_MODE in modes:
        for name in [p.name for p in providers if p.name in ran and p.name in set(memory_providers)]:
            mb, error = measure_peak_extra_mb(registry, name, shape, warmup_shape(shape), dtype,
                                              device, torch.get_num_threads())
            if error:
                print(f"  memory of {name} not measured: {error}", flush=True)
            for r in results:
                if r.provider == name and r.mode == MEMORY_MODE:
                    r.peak_extra_mb = mb
    return results


def run_benchmark(op: str, providers: Sequence[Provider], shapes: Sequence[Shape], *,
                  dtype: torch.dtype, device: torch.device, modes: Sequence[str], repeats: int,
                  warmup: int, registry: str, memory_providers: Iterable[str] = (),
                  csv_path: Path | None = None,
                  warmup_shape: Callable[[Shape], Shape] = _batch_one,
                  after_shape: Callable[[Shape, list[Result]], None] | None = None,
                  ) -> dict[Shape, list[Result]]:
    """The whole benchmark of one op: per shape, time, measure, print the table, append CSV.

    after_shape(shape, results) lets a bench print op-specific lines (e.g. its targets) under
    each table.
    """
    memory_providers = list(memory_providers)
    print(f"{op}: dtype={dtype_name(dtype)} device={device} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} git={git_sha()} repeats={repeats} warmup={warmup} "
          f"modes={','.join(modes)}", flush=True)
    all_results: dict[Shape, list[Result]] = {}
    for shape in shapes:
        start = time.perf_counter()
        results = run_shape(op, providers, shape, dtype=dtype, device=device, modes=modes,
                            repeats=repeats, warmup=warmup, registry=registry,
                            memory_providers=memory_providers, warmup_shape=warmup_shape)
        elapsed = time.perf_counter() - start
        print(f"\n{op} {format_shape(shape)} {dtype_name(dtype)} ({elapsed:.0f} s)", flush=True)
        print(format_table(results), flush=True)
        if after_shape is not None:
            after_shape(shape, results)
        if csv_path is not None and results:
            append_csv(csv_path, op, shape, dtype, device, results)
        all_results[shape] = results
    if csv_path is not None:
        print(f"\nrows appended to {csv_path}", flush=True)
    return all_results


def add_common_args(parser: argparse.ArgumentParser, *, default_shapes: str,
                    provider_names: Sequence[str], default_csv: Path) -> None:
    """The CLI options every bench_<op>.py shares."""
    parser.add_argument("--shapes", default=default_shapes,
                        help=f"comma-separated shapes like 32x6x197x64 (default {default_shapes})")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--providers", default=",".join(provider_names),
                        help=f"comma-separated subset of {','.join(provider_names)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up repeats (default 3)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-providers", default=None,
                        help="providers whose memory is measured (default: all that run)")
    parser.add_argument("--csv", type=Path, default=default_csv,
                        help=f"results CSV to append to (default {default_csv})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")


def resolve_common_args(args: argparse.Namespace, provider_names: Sequence[str]) -> dict:
    """Turns the shared options into keyword arguments of run_benchmark (and sets threads)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"need --repeats >= 1 and --warmup >= 0; got {args.repeats}, {args.warmup}")
    providers = parse_list(args.providers, provider_names, "providers")
    if args.no_memory:
        memory = []
    elif args.memory_providers is None:
        memory = providers
    else:
        memory = parse_list(args.memory_providers, provider_names, "memory providers")
    return {
        "shapes": parse_shapes(args.shapes),
        "dtype": parse_dtype(args.dtype),
        "device": torch.device(args.device),
        "modes": parse_list(args.modes, MODES, "modes"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_providers": memory,
        "csv_path": args.csv,
        "provider_names": providers,
    }


if __name__ == "__main__":
    if "--memory" not in sys.argv[1:]:
        sys.exit("harness.py is a library; run a bench (python -m benchmarks.bench_attention). "
                 "`python -m benchmarks.harness --memory ...` is its memory subprocess.")
    _memory_main()
