"""compare --workers: the order of the tasks (guides before the runs that read them, link before
link_advanced of the same seed, longest runs first), the same numbers as one process, and a
failure in a worker that stops the comparison."""
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train import testhooks  # noqa: E402
from fastattnreg.train.build import cnn_run, guide_runs, source_run  # noqa: E402
from fastattnreg.train.compare import run_compare, run_dir  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.dist import DistContext  # noqa: E402
from fastattnreg.train.methods import parse_method  # noqa: E402
from fastattnreg.train.workers import Task, check_workers, plan_tasks, run_tasks  # noqa: E402
from conftest import requires_cpp  # noqa: E402
from train_helpers import TINY, quiet  # noqa: E402


def _configs(methods, seeds, **kw):
    return {(m, s): TrainConfig(**{**TINY, "method": m, "seed": s, **kw})
            for m in methods for s in seeds}


def _plan(methods, seeds, cache="/nonexistent-cache", time_epochs=1, **kw):
    configs = _configs(methods, seeds, **kw)
    folders = {key: f"out/{key[0]}-s{key[1]}" for key in configs}
    to_train = {key: False for key in configs}
    return configs, plan_tasks(configs, folders, to_train, methods, seeds, time_epochs, cache)


def test_guides_come_before_the_runs_that_read_them():
    methods = ["baseline", "refiner", "link", "link_advanced", "finetune", "gta"]
    configs, tasks = _plan(methods, [0, 1], classes="5-9")
    source = ("guide", source_run(configs[("gta", 0)], parse_method("gta"))[0])
    cnn = {s: ("guide", cnn_run(configs[("link", s)])[0]) for s in (0, 1)}
    # one source for finetune and gta of every seed; one CNN per seed for link and link_advanced
    assert sorted(k for k in tasks if k[0] == "guide") == sorted([source, cnn[0], cnn[1]])
    assert cnn[0] != cnn[1]
    for s in (0, 1):
        assert tasks[("run", "baseline", s)].needs == set()
        assert tasks[("run", "finetune", s)].needs == {source}
        assert tasks[("run", "gta", s)].needs == {source}
        assert tasks[("run", "link", s)].needs == {cnn[s]}
        # link_advanced starts from this comparison's link run of its seed (shared into the cache)
        assert tasks[("run", "link_advanced", s)].needs == {cnn[s], ("run", "link", s)}
    runs = {k for k in tasks if k[0] == "run"}
    assert len(runs) == 12
    for method in methods:  # timings after every run, in the methods' order
        assert tasks[("time", method)].needs >= runs
    assert [k[1] for k in sorted((k for k in tasks if k[0] == "time"),
                                 key=lambda k: tasks[k].order)] == methods
    # guides first, then the longest runs (the Refiner's), then the others
    order = sorted(tasks.values(), key=lambda t: t.order)
    assert [t.key[0] for t in order[:3]] == ["guide"] * 3
    assert [t.key[1] for t in order[3:5]] == ["refiner", "refiner"]


def test_link_advanced_without_its_link_run_trains_the_link_run_as_a_guide():
    configs, tasks = _plan(["baseline", "link_advanced"], [0], time_epochs=0)
    cnn_key, link_key = (("guide", name) for name, _ in guide_runs(configs[("link_advanced", 0)]))
    assert link_key[1].startswith("link-") and cnn_key[1].startswith("cnn-")
    assert tasks[link_key].needs == {cnn_key}  # the link run reads the CNN
    assert tasks[("run", "link_advanced", 0)].needs == {cnn_key, link_key}
    assert not any(k[0] == "time" for k in tasks)


def test_timings_of_runs_read_back_train_their_missing_guides_once():
    configs = _configs(["link", "link_advanced"], [0])
    folders = {key: f"out/{key[0]}-s{key[1]}" for key in configs}
    tasks = plan_tasks(configs, folders, {}, ["link", "link_advanced"], [0], 1,
                       "/nonexistent-cache")
    cnn, link = (name for name, _ in guide_runs(configs[("link_advanced", 0)]))
    assert sorted(tasks) == sorted([("guide", cnn), ("guide", link), ("time", "link"),
                                    ("time", "link_advanced")])
    assert tasks[("time", "link")].needs == {("guide", cnn)}
    assert tasks[("time", "link_advanced")].needs == {("guide", cnn), ("guide", link)}


def test_a_cached_guide_is_not_trained_again(tmp_path):
    configs = _configs(["link"], [0])
    name, cfg = cnn_run(configs[("link", 0)])
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(
        json.dumps({"status": "complete", "config": cfg.to_dict()}))
    _, tasks = _plan(["link"], [0], cache=str(tmp_path))
    assert tasks[("run", "link", 0)].needs == set() and ("guide", name) not in tasks


def test_workers_are_checked_before_anything_runs():
    check_workers(1, DistContext())
    check_workers(3, DistContext())
    with pytest.raises(ValueError, match="--workers must be at least 1; got 0"):
        check_workers(0, DistContext())
    with pytest.raises(ValueError, match="torchrun.*world size 2"):
        check_workers(2, SimpleNamespace(world=2, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="CPU only; got --device cuda"):
        check_workers(2, SimpleNamespace(world=1, device=torch.device("cuda")))
    check_workers(1, SimpleNamespace(world=1, device=torch.device("cuda")))


def _compare(out, cache, workers, methods=("baseline", "link", "link_advanced"), seeds=(0, 1)):
    configs = _configs(methods, seeds, epochs=2, link_advanced_k=2)
    return run_compare(configs, list(methods), list(seeds), str(out), resume=False,
                       ctx=DistContext(), log=quiet, progress=False, cache_dir=str(cache),
                       time_epochs=1, workers=workers)


@pytest.mark.slow
@requires_cpp
def test_two_workers_give_bitwise_the_runs_of_one_process(tmp_path, capfd):
    one = _compare(tmp_path / "one", tmp_path / "cache1", workers=1)
    capfd.readouterr()
    two = _compare(tmp_path / "two", tmp_path / "cache2", workers=2)
    err = capfd.readouterr().err  # the workers' log lines
    assert one["runs"].keys() == two["runs"].keys()
    for key, metrics in one["runs"].items():
        keep = ("train_loss", "train_reg", "train_acc", "test_loss", "test_acc", "lr")
        rows = [[row[k] for k in keep] for row in metrics["epochs"]]
        assert rows == [[row[k] for k in keep] for row in two["runs"][key]["epochs"]], key
        first = torch.load(os.path.join(run_dir(str(tmp_path / "one"), *key), "checkpoint.pt"),
                           weights_only=True)["model"]
        second = torch.load(os.path.join(run_dir(str(tmp_path / "two"), *key), "checkpoint.pt"),
                            weights_only=True)["model"]
        assert all(torch.equal(v, second[k]) for k, v in first.items()), key
    for a, b in zip(one["summary"], two["summary"]):
        assert a["test_accs"] == b["test_accs"] and a["delta"] == b["delta"]
        assert b["epoch_time_fused_s"] > 0 and b["epoch_time_reference_s"] > 0
    # each CNN guide trained once; link_advanced read the shared link runs, trained none
    assert err.count("training cnn guide") == 2 and "training link guide" not in err
    assert sorted(os.listdir(tmp_path / "cache1")) == sorted(os.listdir(tmp_path / "cache2"))
    assert (tmp_path / "two" / "summary.csv").read_text().count("\n") == 4


@pytest.mark.slow
@requires_cpp
def test_a_failing_run_stops_the_comparison(tmp_path, monkeypatch):
    # every worker's first training step raises (the workers inherit the environment)
    monkeypatch.setenv(testhooks.FAIL_RANK, "0")
    with pytest.raises(testhooks.InjectedFault, match="failure injected"):
        _compare(tmp_path / "out", tmp_path / "cache", workers=2, methods=("baseline",))
    assert not (tmp_path / "out" / "metrics.json").exists()


def _sleeps(pid_file: str) -> int:  # in a worker: would hold the comparison for 10 minutes
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    return 0


def _fails(pid_file: str) -> int:  # in the other worker, once the sleeping one has started
    for _ in range(600):
        if os.path.exists(pid_file) and open(pid_file).read():
            break
        time.sleep(0.1)
    raise ValueError("this task fails")


@pytest.mark.slow
def test_a_failure_terminates_the_tasks_still_running(tmp_path):
    pid_file = str(tmp_path / "sleeping.pid")
    tasks = {("slow",): Task(("slow",), (_sleeps, {"pid_file": pid_file}), order=(0,)),
             ("fails",): Task(("fails",), (_fails, {"pid_file": pid_file}), order=(1,))}
    with pytest.raises(ValueError, match="this task fails"):
        run_tasks(tasks, 2, lambda key, result: None)
    pid = int(open(pid_file).read())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left sleeping
        os.kill(pid, 0)
