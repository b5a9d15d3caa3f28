"""Every number, the model and the optional packages are checked before anything is written;
anything unexpected still ends in one line and a non-zero exit."""
import random
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train import cli as cli_module  # noqa: E402
from fastattnreg.train.cli import main  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.validate import check_models  # noqa: E402
from train_helpers import TINY_ARGS, fails_cleanly, out_args  # noqa: E402


@pytest.mark.parametrize("flag, value, needle", [
    ("--lr", "nan", "--lr must be a finite number > 0; got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0; got inf"),
    ("--lr", "0", "--lr must be > 0; got 0.0"),
    ("--lr", "-1e-3", "--lr must be > 0; got -0.001"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0; got -0.1"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0; got nan"),
    ("--epochs", "0", "--epochs must be > 0; got 0"),
    ("--batch-size", "0", "--batch-size must be > 0; got 0"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0; got -1"),
    ("--warmup-epochs", "50", "--warmup-epochs must be in [0, --epochs) = [0, 50); got 50"),
    ("--train-fraction", "nan", "--train-fraction must be a finite number in (0, 1]; got nan"),
    ("--train-fraction", "1.01", "--train-fraction must be in (0, 1]; got 1.01"),
    ("--val-fraction", "1", "--val-fraction must be in [0, 1); got 1.0"),
    ("--val-fraction", "-0.2", "--val-fraction must be in [0, 1); got -0.2"),
    ("--link-advanced-k", "0", "--link-advanced-k must be > 0; got 0"),
    ("--label-smoothing", "1", "--label-smoothing must be in [0, 1); got 1.0"),
    ("--label-smoothing", "-inf", "--label-smoothing must be a finite number in [0, 1)"),
    ("--img-size", "0", "--img-size must be > 0; got 0"),
    ("--gta-weight", "-1", "--gta-weight must be >= 0; got -1.0"),
    ("--gta-weight", "inf", "--gta-weight must be a finite number >= 0; got inf"),
    ("--gta-source-epochs", "0", "--gta-source-epochs must be > 0; got 0"),
    ("--gta-source-seed", "-1", "--gta-source-seed must be in [0, 4294967295]; got -1"),
    ("--link-weight", "nan", "--link-weight must be a finite number >= 0; got nan"),
    ("--link-decay", "0", "--link-decay must be in (0, 1]; got 0.0"),
    ("--link-decay", "1.5", "--link-decay must be in (0, 1]; got 1.5"),
    ("--cnn-epochs", "0", "--cnn-epochs must be > 0; got 0"),
    ("--cnn-lr", "-inf", "--cnn-lr must be a finite number > 0; got -inf"),
    ("--threads", "0", "--threads must be > 0; got 0"),
    ("--ddp-timeout", "nan", "--ddp-timeout must be a finite number > 0; got nan"),
    ("--ddp-timeout", "-5", "--ddp-timeout must be > 0; got -5.0"),
    ("--seed", "4294967296", "--seed must be in [0, 4294967295]; got 4294967296"),
    ("--structured-kernel", "4", "--structured-kernel must be 3 or 5; got 4"),
])
def test_each_number_is_checked(capsys, tmp_path, flag, value, needle):
    fails_cleanly(capsys, tmp_path, ["train", f"{flag}={value}"] + out_args(tmp_path), needle)


def test_compare_seeds_and_numbers(capsys, tmp_path):
    fails_cleanly(capsys, tmp_path, ["compare", "--seeds", "0,-2"] + out_args(tmp_path),
                  "--seeds must be in [0, 4294967295]; got -2")
    fails_cleanly(capsys, tmp_path, ["compare", "--lr", "nan"] + out_args(tmp_path),
                  "--lr must be a finite number > 0; got nan")
    fails_cleanly(capsys, tmp_path, ["compare", "--time-epochs", "-1"] + out_args(tmp_path),
                  "--time-epochs must be >= 0; got -1")


@pytest.mark.parametrize("argv, needle", [
    (["--model-opt", "drop_rate=nan"], "--model-opt drop_rate=nan: must be a finite number"),
    (["--model-opt", "num_heads=5"], "embed_dim=64 must be divisible by num_heads=5"),
    (["--model-opt", "depth=two"], "ViTConfig.depth must be a positive int; got 'two'"),
    (["--method", "structured", "--structured-kernel", "5", "--model-opt", "patch_size=4"],
     "--method structured with --model-opt patch_size=4: the patch grid (2x2) is too small for "
     "kernel_size=5"),
    (["--method", "link", "--link-cnn-layers", "layer2,nope"],
     "--method link: cnn_layers: cnn has no submodule named 'nope'"),
    (["--method", "link_advanced", "--link-advanced-k", "17"],
     "--link-advanced-k: k must be an int in [1, 16] (links per CNN channel, at most M*H = 16)"),
    (["--method", "gta", "--model-opt", "class_token=false"],
     "global_pool='token' needs class_token=True"),
])
def test_model_and_method_are_checked_by_a_dry_run(capsys, tmp_path, argv, needle):
    fails_cleanly(capsys, tmp_path, ["train", *argv] + out_args(tmp_path), needle)


def test_the_dry_run_moves_no_rng():
    configs = [TrainConfig(method=m, classes="5-9") for m in
               ("structured", "mimetic", "refiner", "gta", "finetune", "link", "link_advanced",
                "cnn")]
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    want = (torch.rand(4).tolist(), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    check_models(configs, "digits", 32)
    assert (torch.rand(4).tolist(), random.random(), np.random.rand()) == want


@pytest.mark.parametrize("module, argv, needle", [
    ("tqdm", ["train"], "training (progress bars and log lines) needs the package 'tqdm'"),
    ("sklearn", ["train"], "--data digits (scikit-learn's bundled digits) needs the package "
                           "'scikit-learn'"),
    ("matplotlib", ["compare", "--methods", "baseline"],
     "compare (accuracy.png, attention.png) needs the package 'matplotlib'"),
    ("torchvision", ["train", "--method", "link", "--link-cnn", "torchvision:resnet18:W"],
     "--link-cnn torchvision:resnet18:W needs the package 'torchvision'"),
    ("torchvision", ["train", "--data", "folder:F"], "--data folder:PATH (ImageFolder) needs "
                                                     "the package 'torchvision'"),
])
def test_missing_optional_packages_are_named(capsys, tmp_path, monkeypatch, module, argv,
                                             needle):
    (tmp_path / "W").write_bytes(b"weights")
    for part in ("train", "test"):
        (tmp_path / "F" / part / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    fails_cleanly(capsys, tmp_path, argv + out_args(tmp_path), needle)
    fails_cleanly(capsys, tmp_path, argv + out_args(tmp_path), "pip install 'fastattnreg[train]'")


def test_an_unexpected_error_is_one_line_and_the_traceback_only_when_asked(
        capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("inside the trainer")

    monkeypatch.setattr(cli_module, "train_run", broken)
    argv = ["train", *TINY_ARGS] + out_args(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["fastattnreg: error: ZeroDivisionError: inside the trainer "
                                "(FASTATTNREG_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("FASTATTNREG_DEBUG", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and "def broken" not in err[-1]
    assert err[-1] == "fastattnreg: error: ZeroDivisionError: inside the trainer"


@pytest.mark.parametrize("argv, needle", [
    (["--method", "gta"], "the task has every class: give the task's classes"),
    (["--method", "finetune", "--classes", "0-9"], "leaves no other classes"),
    (["--classes", "3-12"], "--classes '3-12': labels must lie in [0, 9]"),
])
def test_transfer_settings_fail_before_any_file(capsys, tmp_path, argv, needle):
    fails_cleanly(capsys, tmp_path, ["train", *argv] + out_args(tmp_path), needle)
