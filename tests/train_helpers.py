"""Small trainer runs for the trainer's test files: a tiny configuration (TINY for TrainConfig,
TINY_ARGS for the command line), one run in-process, the command line in a child process or
in-process (fails_cleanly: a bad command line's one-line error, nothing written), readers of what
a run leaves behind, and a fake CIFAR-10 folder."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")  # the trainer's data (the training extra)
from fastattnreg.train.cli import main  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import ROOT  # noqa: E402

# A small ViT on 5% of digits (67 images: batches of 32, 32, 3): seconds per run.
TINY = dict(train_fraction=0.05, epochs=1, batch_size=32, warmup_epochs=0,
            model_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2},
            gta_source_epochs=1, cnn_epochs=1)
TINY_ARGS = ["--train-fraction", "0.05", "--batch-size", "32", "--warmup-epochs", "0",
             "--model-opt", "depth=2", "--model-opt", "embed_dim=32", "--model-opt",
             "num_heads=2", "--no-progress"]


def quiet(_line):
    pass


def run(tmp_path, name="run", **kw):
    cfg = TrainConfig(**{**TINY, **kw})
    return train_run(cfg, str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                     progress=False, log=quiet)


def cli(*args, env=None, cwd=None):
    """`python -m fastattnreg ...` in a fresh process: (returncode, stdout, stderr)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    p = subprocess.run([sys.executable, "-m", "fastattnreg", *args], capture_output=True,
                       text=True, env=full_env, cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def history(metrics):
    """Per-epoch numbers that must be reproducible (everything but wall time)."""
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in metrics["epochs"]]


def model_state(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["model"]


def fake_cifar(root, per_batch=20):
    """A CIFAR-10 folder in its pickled batch format under `root`, `per_batch` random images
    per batch, labels cycling through the 10 classes."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def fails_cleanly(capsys, tmp_path, argv, needle):
    """main(argv) exits 2 with one stderr line containing needle, creating nothing."""
    before = sorted(os.listdir(tmp_path))
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fastattnreg: error: "), err
    assert needle in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no cache, no temp file


def out_args(tmp_path):
    """--out and --cache-dir inside tmp_path."""
    return ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
