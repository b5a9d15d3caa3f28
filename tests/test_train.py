"""The trainer (fastattnreg.train): every method trains a few steps, --resume reproduces an
uninterrupted run exactly, DDP on 2 CPU processes matches 1 process, the data sources load."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train.build import build, source_config  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.data import DataError, augment, load_data, parse_classes  # noqa: E402
from fastattnreg.train.dist import DistContext  # noqa: E402
from fastattnreg.train.methods import parse_method  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import ROOT, requires_cpp  # noqa: E402
from train_helpers import (TINY, TINY_ARGS, cli, fake_cifar, history, model_state,  # noqa: E402
                           quiet, run)


# ------------------------------------------------------------------------------ methods

@requires_cpp
@pytest.mark.parametrize("method", ["baseline", "structured", "mimetic", "refiner", "gta",
                                    "finetune", "link", "cnn", "structured+gta"])
@pytest.mark.slow
def test_each_method_trains(tmp_path, method):
    # The source of gta / finetune needs classes the task does not have: it sees them all here.
    m = run(tmp_path, method=method, gta_source_classes="all")
    assert m["status"] == "complete" and m["method"] == method
    (row,) = m["epochs"]
    assert np.isfinite([row["train_loss"], row["test_loss"], row["train_reg"]]).all()
    assert m["data"]["train_images"] == 67 and m["data"]["test_images"] == 450
    # Accuracies are counts of correct images over the whole split (not means of batch means).
    for acc, images in ((row["test_acc"], 450), (row["train_acc"], 67)):
        assert acc * images == pytest.approx(round(acc * images), abs=1e-9), (acc, images)
    if method in ("link",):
        assert row["train_reg"] > 0  # the link loss is on
    if method == "baseline":
        assert row["train_reg"] == 0
    folder = tmp_path / "run"
    for f in ("metrics.json", "log.csv", "checkpoint.pt"):
        assert (folder / f).is_file()
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]  # atomic writes only
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert on_disk["config"]["method"] == method and "torch" in on_disk["versions"]
    assert len((folder / "log.csv").read_text().splitlines()) == 2


@pytest.mark.slow
@requires_cpp
def test_gta_student_starts_at_the_source_and_guides_are_cached(tmp_path):
    m = run(tmp_path, method="gta", epochs=2, classes="5-9")
    caches = os.listdir(tmp_path / "cache")
    assert len(caches) == 1 and caches[0].startswith("gta-source-")
    source_metrics = json.loads((tmp_path / "cache" / caches[0] / "metrics.json").read_text())
    # the source never sees the task's labels: it trains on the other digits, 0-4
    assert source_metrics["config"]["classes"] == "0,1,2,3,4"
    assert source_metrics["data"]["num_classes"] == 5 and m["data"]["num_classes"] == 5
    source = model_state(tmp_path / "cache" / caches[0])
    student = model_state(tmp_path / "run")
    # fine-tuned from the source: same architecture, weights moved away from it
    assert source.keys() == student.keys()
    assert any(not torch.equal(source[k], student[k]) for k in source)
    # a second run finds the cached source instead of training it again
    mtime = os.path.getmtime(tmp_path / "cache" / caches[0] / "checkpoint.pt")
    run(tmp_path, name="again", method="gta", gta_weight=2.0, classes="5-9")
    assert os.listdir(tmp_path / "cache") == caches
    assert os.path.getmtime(tmp_path / "cache" / caches[0] / "checkpoint.pt") == mtime
    # The student starts as the source (regulariser 0 at the first step) and moves away from it.
    assert m["epochs"][0]["train_reg"] > 0


@pytest.mark.slow
@requires_cpp
def test_link_with_a_torchvision_cnn_from_a_local_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    m = run(tmp_path, method="link", link_cnn=f"torchvision:resnet18:{weights}")
    assert m["epochs"][0]["train_reg"] > 0


# ------------------------------------------------------------------------------ resume

@pytest.mark.slow
@requires_cpp
def test_resume_after_a_kill_gives_the_same_final_metrics(tmp_path):
    """Run 1 epoch of a 3-epoch run (the checkpoint is what a kill leaves), continue it with
    `--resume` in a fresh process, and compare with an uninterrupted run: equal numbers."""
    cfg = dict(method="link", epochs=3, augment="crop")
    # Bitwise equality holds for one thread count: the resumed process (cli) runs one thread,
    # so the in-process runs do too (two threads split reductions differently: ~1e-7 apart).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = run(tmp_path, name="whole", **cfg)
        part = TrainConfig(**{**TINY, **cfg})
        stopped = train_run(part, str(tmp_path / "killed"), cache_dir=str(tmp_path / "cache"),
                            progress=False, log=quiet, stop_after_epoch=1)
    finally:
        torch.set_num_threads(threads)
    assert stopped["status"] == "running" and len(stopped["epochs"]) == 1
    rc, out, err = cli("train", "--method", "link", "--epochs", "3", "--augment", "crop",
                       "--gta-source-epochs", "1", "--cnn-epochs", "1", *TINY_ARGS,
                       "--out", str(tmp_path / "killed"), "--cache-dir", str(tmp_path / "cache"),
                       "--resume")
    assert rc == 0, err
    assert "resuming after epoch 1/3" in err
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["status"] == "complete"
    assert history(resumed) == history(whole)
    a, b = model_state(tmp_path / "whole"), model_state(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@requires_cpp
def test_same_seed_same_run_and_other_seed_other_run(tmp_path):
    a = run(tmp_path, name="a", seed=3)
    b = run(tmp_path, name="b", seed=3)
    c = run(tmp_path, name="c", seed=4)
    assert history(a) == history(b)
    assert history(a) != history(c)


@pytest.mark.slow
@requires_cpp
def test_eval_every_changes_no_number_of_the_training(tmp_path):
    every = run(tmp_path, name="every", epochs=3, method="refiner")
    sparse = run(tmp_path, name="sparse", epochs=3, method="refiner", eval_every=2)
    trained = ("train_loss", "train_reg", "train_acc", "lr")
    assert [[h[k] for k in trained] for h in every["epochs"]] == \
        [[h[k] for k in trained] for h in sparse["epochs"]]
    # evaluated after epoch 2 (every 2nd) and epoch 3 (the last), with the same numbers
    assert [h["test_acc"] is None for h in sparse["epochs"]] == [True, False, False]
    for e in (1, 2):
        assert sparse["epochs"][e]["test_acc"] == every["epochs"][e]["test_acc"]
    assert sparse["final"]["test_acc"] == every["final"]["test_acc"]
    assert model_state(tmp_path / "every").keys() == model_state(tmp_path / "sparse").keys()
    assert all(torch.equal(v, model_state(tmp_path / "sparse")[k])
               for k, v in model_state(tmp_path / "every").items())
    rows = (tmp_path / "sparse" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    assert first["test_loss"] == first["test_acc"] == "" and first["train_loss"] != ""


# ------------------------------------------------------------------------------ DDP

@pytest.mark.slow
@requires_cpp
def test_ddp_two_cpu_processes_match_one(tmp_path):
    args = ["train", "--method", "baseline", "--epochs", "2", *TINY_ARGS,
            "--cache-dir", str(tmp_path / "cache")]
    rc, _, err = cli(*args, "--out", str(tmp_path / "one"))
    assert rc == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "fastattnreg", *args,
                        "--out", str(tmp_path / "two")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for h1, h2 in zip(one["epochs"], two["epochs"]):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert h1[key] == pytest.approx(h2[key], rel=1e-4, abs=3e-3), key
    a, b = model_state(tmp_path / "one"), model_state(tmp_path / "two")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


# ------------------------------------------------------------------------------ data

def test_digits_split_is_fixed_and_stratified():
    full = load_data("digits", 1.0)
    part = load_data("digits", 0.1)
    assert (len(full.y_train), len(full.y_test)) == (1347, 450)
    assert torch.equal(full.y_test, part.y_test)  # the test split never moves
    assert len(part.y_train) == 135
    counts = torch.bincount(part.y_train, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 14  # stratified
    assert full.x_train.dtype == torch.uint8 and full.x_train.max() == 16


def test_augment_is_reproducible_and_keeps_shapes():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    for mode in ("flip", "crop", "crop-flip"):
        a = augment(x, mode, torch.Generator().manual_seed(1))
        b = augment(x, mode, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(augment(x, "none", torch.Generator()), x)
    flipped = augment(x, "flip", torch.Generator().manual_seed(0))
    assert all(torch.equal(f, x[i]) or torch.equal(f, x[i].flip(-1))
               for i, f in enumerate(flipped))


def test_cifar10_folder_format_reads_locally(tmp_path):
    fake_cifar(tmp_path)
    d = load_data(f"cifar10:{tmp_path}", 0.5)
    assert d.x_train.shape == (50, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    assert d.num_classes == 10 and d.full_train_size == 100


def test_image_folder_reads_train_and_test(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for part, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / part / cls / f"{i}.png")
    d = load_data(f"folder:{tmp_path}", 1.0, img_size=16)
    assert d.x_train.shape == (8, 3, 16, 16) and d.x_test.shape == (4, 3, 16, 16)
    assert d.classes == ["cat", "dog"] and d.y_train.tolist() == [0] * 4 + [1] * 4


def test_classes_select_and_renumber_labels():
    full, part = load_data("digits", 1.0), load_data("digits", 1.0, classes="5-9")
    assert part.num_classes == 5 and part.classes == ["5", "6", "7", "8", "9"]
    assert torch.equal(part.y_test, full.y_test[full.y_test >= 5] - 5)
    assert torch.equal(part.x_train, full.x_train[full.y_train >= 5])
    assert torch.equal(part.mean, full.mean)  # one pixel scale for source and task
    odd = load_data("digits", 1.0, classes="1,3,5-5")
    assert odd.classes == ["1", "3", "5"] and set(odd.y_train.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("text", ["10", "5-3", "a", "", "-1"])
def test_bad_classes_are_refused(text):
    if text == "":
        assert parse_classes(text, 10) == list(range(10))
        return
    with pytest.raises(DataError, match="--classes"):
        parse_classes(text, 10)


@pytest.mark.slow
@requires_cpp
def test_finetune_starts_at_the_source_with_a_new_head(tmp_path):
    cfg = TrainConfig(**{**TINY, "method": "finetune", "classes": "5-9"})
    data = load_data("digits", cfg.train_fraction, classes=cfg.classes)
    built = build(cfg, data, cache_dir=str(tmp_path), ctx=DistContext(), log=quiet,
                  progress=False, train_guide=train_run)
    (folder,) = os.listdir(tmp_path)
    source = model_state(tmp_path / folder)
    student = built.model.state_dict()
    assert source_config(cfg, parse_method("finetune")).classes == "0,1,2,3,4"
    for k in source:
        same = torch.equal(source[k], student[k])
        assert same == (not k.startswith("head.")), k  # body copied, head drawn anew
    logits, reg = built.task(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 5) and reg.item() == 0.0


@pytest.mark.slow
@requires_cpp
def test_bf16_precision_runs_the_attention_ops_in_bf16(tmp_path, monkeypatch):
    seen = []
    fwd = torch.ops.fastattnreg.attention_fwd

    class Spy:
        def __call__(self, q, *args):
            seen.append(q.dtype)
            return fwd(q, *args)

    monkeypatch.setattr(torch.ops.fastattnreg, "attention_fwd", Spy(), raising=False)
    m = run(tmp_path, precision="bf16")
    assert m["config"]["precision"] == "bf16"
    assert np.isfinite(m["epochs"][0]["train_loss"])
    assert seen and set(seen) == {torch.bfloat16}  # no float32 round trip under autocast
