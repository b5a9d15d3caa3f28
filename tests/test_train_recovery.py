"""Nothing lost, nothing stale: a run killed with SIGKILL at any moment (mid-epoch, inside the
checkpoint write, before its first checkpoint) resumes to the numbers of an uninterrupted run,
bitwise on the CPU, leaving no temporary file; a loss that is not finite stops the run without
touching its last checkpoint; `compare --resume` reuses a run only with the same settings."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train.checkpoint import stale_temps  # noqa: E402
from fastattnreg.train.cli import main  # noqa: E402
from fastattnreg.train.compare import resume_plan  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import ROOT, requires_cpp  # noqa: E402
from train_helpers import TINY, TINY_ARGS, cli, history, out_args, quiet  # noqa: E402

# 30 short epochs (about 0.05 s each): a kill right after the first checkpoint lands mid-run
KILL_ARGS = ["train", "--method", "baseline", "--epochs", "30", "--augment", "crop",
             "--threads", "1", *TINY_ARGS]


def start(out, cache, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "fastattnreg", *KILL_ARGS, "--out", str(out),
                             "--cache-dir", str(cache)], env=full_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, limit=120.0):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
        assert time.monotonic() - t0 < limit, "timed out waiting for the run"
        time.sleep(0.002)


def writing(folder):
    """Whether a checkpoint write is under way (its temporary file exists)."""
    return any(n.startswith(".checkpoint.pt.") for n in stale_temps(folder))


def sigkill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def checkpoint_epoch(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["epoch"]


def final_state(folder):
    """metrics.json's numbers (wall times left out), the model and the optimizer state."""
    ckpt = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    return metrics, ckpt


def assert_same_run(folder, ref):
    (m1, c1), (m2, c2) = final_state(folder), final_state(ref)
    assert m1["status"] == "complete" and history(m1) == history(m2)
    assert all(torch.equal(c1["model"][k], c2["model"][k]) for k in c2["model"])
    s1, s2 = c1["optimizer"]["state"], c2["optimizer"]["state"]
    assert all(torch.equal(s1[i][n], s2[i][n]) for i in s2 for n in s2[i])
    assert stale_temps(folder) == []  # the resume removed what the kill left


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, by the same command line in its own process."""
    root = tmp_path_factory.mktemp("reference")
    rc, _, err = cli(*KILL_ARGS, "--out", str(root / "run"), "--cache-dir", str(root / "cache"))
    assert rc == 0, err
    return root / "run"


def resume(out, cache):
    rc, _, err = cli(*KILL_ARGS, "--out", str(out), "--cache-dir", str(cache), "--resume")
    assert rc == 0, err
    return err


@pytest.mark.slow
@requires_cpp
def test_sigkill_mid_epoch_then_resume_is_bitwise_the_same(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache")
    wait_for(lambda: os.path.exists(out / "checkpoint.pt"), proc)
    sigkill(proc)
    done = checkpoint_epoch(out)
    assert 1 <= done < 30
    err = resume(out, tmp_path / "cache")
    assert f"resuming after epoch {done}/30" in err
    assert_same_run(out, reference)


@pytest.mark.slow
@requires_cpp
def test_sigkill_inside_the_checkpoint_write_then_resume(tmp_path, reference):
    """Every checkpoint write sleeps (test hook) between writing its temporary file and the
    rename; the kill comes during the second write: checkpoint.pt is still the whole first."""
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache", env={"FASTATTNREG_TEST_CHECKPOINT_PAUSE": "0.5"})
    wait_for(lambda: os.path.exists(out / "checkpoint.pt") and writing(out), proc)
    time.sleep(0.1)
    sigkill(proc)
    assert stale_temps(out) and checkpoint_epoch(out) == 1
    err = resume(out, tmp_path / "cache")
    assert "resuming after epoch 1/30" in err and "removed 1 temporary file" in err
    assert_same_run(out, reference)


@pytest.mark.slow
@requires_cpp
def test_sigkill_before_the_first_checkpoint_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out, tmp_path / "cache", env={"FASTATTNREG_TEST_CHECKPOINT_PAUSE": "0.5"})
    wait_for(lambda: writing(out), proc)
    sigkill(proc)
    assert not os.path.exists(out / "checkpoint.pt")
    err = resume(out, tmp_path / "cache")
    assert "holds no checkpoint yet" in err
    assert_same_run(out, reference)


def test_resume_refuses_a_folder_that_is_no_run(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["train", "--resume", *TINY_ARGS] + out_args(tmp_path)) == 2
    assert "holds no checkpoint.pt (files: notes.txt)" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    os.unlink(tmp_path / "out" / "notes.txt")
    (tmp_path / "out" / "metrics.json").write_text("{}")  # a run's result, its checkpoint gone
    assert main(["train", "--resume", *TINY_ARGS] + out_args(tmp_path)) == 2
    assert "holds no checkpoint.pt (files: metrics.json)" in capsys.readouterr().err


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@requires_cpp
def test_a_loss_that_is_not_finite_stops_and_keeps_the_last_checkpoint(capsys, tmp_path):
    # a good first epoch of two ...
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    train_run(cfg, str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), progress=False,
              log=quiet, stop_after_epoch=1)
    folder = tmp_path / "out"
    # ... then an optimizer state that throws the weights to inf on the next step
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    for state in ckpt["optimizer"]["state"].values():
        state["exp_avg"].fill_(3e38)
        state["exp_avg_sq"].zero_()
    torch.save(ckpt, folder / "checkpoint.pt")
    before = {name: digest(folder / name) for name in ("checkpoint.pt", "metrics.json")}
    argv = ["train", "--epochs", "2", "--gta-source-epochs", "1", "--cnn-epochs", "1", *TINY_ARGS,
            "--resume"] + out_args(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastattnreg: error: [out] epoch 2/2, step 2: the training loss is "
                              "not finite (cross-entropy nan"), err
    assert "its last checkpoint (after epoch 1) is left as it was" in err[-1]
    assert {name: digest(folder / name) for name in before} == before
    assert stale_temps(folder) == []
    # from scratch: no checkpoint is ever written
    argv = ["train", "--epochs", "2", "--lr", "1e10", *TINY_ARGS, "--out",
            str(tmp_path / "fresh"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 1
    assert "(none was written)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "fresh")) == ["log.csv"]


# ------------------------------------------------------------------------------ compare

@pytest.mark.slow
@requires_cpp
def test_compare_resume_reruns_a_run_whose_settings_changed(capsys, tmp_path):
    base = ["compare", "--methods", "baseline", "--seeds", "0", *TINY_ARGS] + out_args(tmp_path)
    assert main(base + ["--epochs", "2"]) == 0
    capsys.readouterr()
    run = tmp_path / "out" / "runs" / "baseline-s0"
    assert main(base + ["--epochs", "3", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "[compare] baseline seed 0: finished earlier with other settings (epochs); " \
           "training it again" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and metrics["config"]["epochs"] == 3
    top = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(top["runs"][0]["epochs"]) == 3
    mtime = os.path.getmtime(run / "checkpoint.pt")
    assert main(base + ["--epochs", "3", "--resume"]) == 0
    assert "baseline seed 0: finished earlier, read back" in capsys.readouterr().err
    assert os.path.getmtime(run / "checkpoint.pt") == mtime
    # another learning rate: rerun again
    assert main(base + ["--epochs", "3", "--lr", "1e-3", "--resume"]) == 0
    assert "other settings (lr); training it again" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["config"]["lr"] == 1e-3


@requires_cpp
def test_resume_plan_of_an_unfinished_run(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    folder = tmp_path / "run"
    assert resume_plan(str(folder), cfg) == ("restart", "")
    train_run(cfg, str(folder), cache_dir=str(tmp_path / "cache"), progress=False, log=quiet,
              stop_after_epoch=1)
    assert resume_plan(str(folder), cfg) == ("continue", "")
    assert resume_plan(str(folder), cfg.with_(weight_decay=0.0)) == (
        "restart", "its checkpoint has other settings (weight_decay)")
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    ckpt["rng"]["numpy"] = np.random.get_state()  # a numpy array: not weights-only loadable
    torch.save(ckpt, folder / "checkpoint.pt")
    plan, why = resume_plan(str(folder), cfg)
    assert plan == "restart" and "refused to load" in why
