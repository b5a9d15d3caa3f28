"""`compare --workers N`: a comparison's guides, runs and epoch timings in N worker processes.

Each worker is a fresh (spawned) Python process with the parent's torch thread count; it trains
whole runs with the same code as a sequential comparison (trainer.train_run into the run's own
folder), so a run's numbers do not depend on which worker trained it or in which order: on the
CPU they are bitwise those of `--workers 1` (tests/test_train_workers.py).

Order. A run starts only after the guides it reads (build.guide_runs) are in the cache: the gta
source and the link CNNs are trained first, once each, as tasks of their own; link_advanced
starts after the `link` run of its seed (shared into the cache by build.share_link_run, as in a
sequential comparison) or, without one in the comparison, after its own basic link run. Among the
tasks that may start, guides go first, then the runs that take longest (Refiner runs: about
twice a plain run's epoch), so that the last runs to finish are short ones. The epoch timings
(backend_timing.py) run last, one task per method.

A task that fails (a loss that is not finite, anything else) stops the comparison: the other
workers are terminated and the error is raised in the parent. Every run's last checkpoint is
complete (the trainer writes them atomically), so `compare --resume` continues where it stopped.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Union

import torch

from .backend_timing import time_backends
from .build import cached_run, guide_is_cached, guide_runs, shared_link_run
from .dist import DistContext
from .methods import parse_method
from .trainer import log_to_stderr, train_run

class GuideKey(NamedTuple):
    """A guide to train into the cache: ("guide", its cache folder's name)."""
    kind: str
    name: str


class RunKey(NamedTuple):
    """A run of the comparison: ("run", method, seed)."""
    kind: str
    method: str
    seed: int


class TimeKey(NamedTuple):
    """A method's epoch timing on both backends: ("time", method)."""
    kind: str
    method: str


# What a task is; each key equals (and hashes as) the plain tuple of its fields.
TaskKey = Union[GuideKey, RunKey, TimeKey]


@dataclass
class Task:
    key: TaskKey
    call: tuple  # (a function of this module run in a worker, its keyword arguments)
    needs: set = field(default_factory=set)  # keys of the tasks that must finish first
    order: tuple = ()  # smaller starts first among the tasks that may start


def check_workers(workers: int, ctx: DistContext) -> None:
    """ValueError when `workers` processes cannot run this comparison."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1; got {workers}")
    if workers > 1 and ctx.world > 1:
        raise ValueError(f"--workers {workers} cannot be combined with torchrun (world size "
                         f"{ctx.world}): each DDP rank trains every run together with the others")
    if workers > 1 and ctx.device.type != "cpu":
        raise ValueError(f"--workers {workers} runs on the CPU only; got --device "
                         f"{ctx.device.type} (one process per run would share one GPU)")


def run_cost(config) -> float:
    """A run's relative cost, for the longest-first order: epochs, twice for a Refiner run."""
    return config.epochs * (2.0 if parse_method(config.method).refiner else 1.0)


def plan_tasks(configs: dict, folders: dict, to_train: dict, methods: list, seeds: list,
               time_epochs: int, cache_dir: str) -> dict[TaskKey, Task]:
    """The tasks of a comparison: `to_train` {(method, seed): resume?} are the runs to train
    (the others were read back); configs and folders {(method, seed): TrainConfig, run folder}
    hold every run's settings and folder; each method's timing trains its first seed's task."""
    tasks: dict[TaskKey, Task] = {}
    # Guides a `link` run of this comparison leaves in the cache (share_link_run) when it ends.
    shared = {}
    for (method, seed), config in configs.items():
        link = shared_link_run(config)
        if link is not None and (method, seed) in to_train:
            shared[link[0]] = RunKey("run", method, seed)

    def guides_of(config) -> set:
        """The keys of the tasks that put the guides `config` reads into the cache (added to
        `tasks` once each); none for a guide already there."""
        needs = set()
        for name, cfg in guide_runs(config):
            if name in shared:  # this comparison's link run of the same seed
                needs.add(shared[name])
                continue
            if guide_is_cached(cache_dir, name, cfg):
                continue
            key = GuideKey("guide", name)
            if key not in tasks:  # a guide reads the guides before it in the list (link: cnn)
                tasks[key] = Task(key, (_train_guide, {"cfg": cfg, "name": name,
                                                       "cache_dir": cache_dir}),
                                  needs=set(needs), order=(0, -run_cost(cfg)))
            needs.add(key)
        return needs

    for (method, seed), resume in to_train.items():
        config = configs[(method, seed)]
        key = RunKey("run", method, seed)
        tasks[key] = Task(
            key,
            (_train_run, {"config": config, "folder": folders[(method, seed)],
                          "resume": resume, "name": f"{method}-s{seed}", "cache_dir": cache_dir}),
            needs=guides_of(config), order=(1, -run_cost(config)))
    every_run = {RunKey("run", m, s) for (m, s) in to_train}
    for i, method in enumerate(methods if time_epochs > 0 else ()):
        config = configs[(method, seeds[0])]
        key = TimeKey("time", method)
        tasks[key] = Task(
            key,
            (_time_method, {"config": config, "cache_dir": cache_dir, "rounds": time_epochs}),
            needs=every_run | guides_of(config), order=(2, i))
    return tasks


def run_tasks(tasks: dict[TaskKey, Task], workers: int,
              on_done: Callable[[TaskKey, object], None]) -> dict[TaskKey, object]:
    """Runs `tasks` in `workers` processes in dependency order and returns {key: what the task
    returned}; on_done(key, result) runs in this process as each task ends, before the tasks
    that need it start. The first failure terminates the workers and is raised here."""
    results: dict[TaskKey, object] = {}
    pending = dict(tasks)
    running: dict = {}
    done: set = set()
    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(torch.get_num_threads(),))
    try:
        while pending or running:
            ready = sorted((t for t in pending.values() if t.needs <= done), key=lambda t: t.order)
            for task in ready[:workers - len(running)]:
                fn, kwargs = task.call
                running[pool.submit(fn, **kwargs)] = task.key
                del pending[task.key]
            if not running:  # cannot happen for the tasks plan_tasks makes
                raise RuntimeError(f"compare --workers: tasks wait on each other: "
                                   f"{sorted(pending)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                results[key] = future.result()  # a worker's exception is raised here
                on_done(key, results[key])
                done.add(key)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancels what has not started and terminates the workers (their runs' last checkpoints
    stay complete). ProcessPoolExecutor has no public terminate before Python 3.14."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=30)


# ------------------------------------------------------------------------------ in the workers

def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_guide(cfg, name: str, cache_dir: str) -> None:
    cached_run(cfg, name, cache_dir=cache_dir, ctx=DistContext(), log=log_to_stderr,
               progress=False, train_guide=train_run)


def _train_run(config, folder: str, resume: bool, name: str, cache_dir: str) -> dict:
    return train_run(config, folder, resume=resume, ctx=DistContext(), log=log_to_stderr,
                     progress=False, name=name, cache_dir=cache_dir)


def _time_method(config, cache_dir: str, rounds: int) -> dict:
    return time_backends(config, cache_dir=cache_dir, ctx=DistContext(), log=log_to_stderr,
                         rounds=rounds)

