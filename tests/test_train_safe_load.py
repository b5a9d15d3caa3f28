"""Safe loading: checkpoints, guides and --gta-source are read with weights_only=True, CIFAR
batches through an allow-list unpickler; a crafted pickle is refused with one line (exit 2) and
its code never runs. RNG states survive a weights-only round trip exactly."""
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train.checkpoint import rng_state, set_rng_state  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.data import load_data, read_cifar_batch  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import requires_cpp  # noqa: E402
from train_helpers import TINY, TINY_ARGS, fails_cleanly, fake_cifar, history  # noqa: E402


class MakesADirectory:
    """Unpickling this calls os.mkdir(marker): the marker shows whether its code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def crafted_checkpoint(path, marker):
    torch.save({"model": MakesADirectory(marker), "config": {}, "vit_config": {}}, path)


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    """The files below are the real thing: plain torch.load / pickle.load would run them."""
    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "c.pt", marker)
    torch.load(tmp_path / "c.pt", weights_only=False)
    assert marker.is_dir()
    os.rmdir(marker)
    pickle.loads(pickle.dumps({b"data": MakesADirectory(marker)}, protocol=2))
    assert marker.is_dir()


def test_resume_refuses_a_crafted_checkpoint(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "ran"
    crafted_checkpoint(out / "checkpoint.pt", marker)
    fails_cleanly(capsys, out, ["train", "--resume", "--out", str(out), *TINY_ARGS,
                                "--cache-dir", str(tmp_path / "cache")],
                  "it names posix.mkdir, not a tensor or plain container")
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_gta_source_refuses_a_crafted_checkpoint(capsys, tmp_path):
    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "source.pt", marker)
    fails_cleanly(capsys, tmp_path, ["train", "--method", "gta", "--gta-source",
                                     str(tmp_path / "source.pt"), *TINY_ARGS,
                                     "--out", str(tmp_path / "out"),
                                     "--cache-dir", str(tmp_path / "cache")],
                  "--gta-source: refused to load")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batch_with_code_is_refused(capsys, tmp_path, protocol):
    fake_cifar(tmp_path / "data")
    marker = tmp_path / "ran"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({b"data": MakesADirectory(marker), b"labels": [0]}, f, protocol=protocol)
    fails_cleanly(capsys, tmp_path, ["train", "--data", f"cifar10:{tmp_path / 'data'}",
                                     *TINY_ARGS, "--out", str(tmp_path / "out"),
                                     "--cache-dir", str(tmp_path / "cache")],
                  "cannot read data_batch_3: refused to load posix.mkdir")
    assert not marker.exists()


def test_cifar_unpickler_reads_numpy_arrays_of_every_pickle_flavour(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": data,
             b"filenames": [b"a.png", b"b.png"], b"scale": np.float64(0.5)}
    blobs = [pickle.dumps(batch, protocol=p) for p in (2, 4, 5)]
    # CIFAR-10's own files come from python 2 / numpy 1: they name numpy.core, not numpy._core
    blobs.append(blobs[0].replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in blobs[-1]
    for blob in blobs:
        got = read_cifar_batch(io.BytesIO(blob))
        assert np.array_equal(got[b"data"], data) and got[b"data"].dtype == np.uint8
        assert got[b"labels"] == [3, 7] and got[b"filenames"] == [b"a.png", b"b.png"]
        assert got[b"scale"] == 0.5
    fake_cifar(tmp_path, per_batch=10)
    assert load_data(f"cifar10:{tmp_path}").x_train.shape == (50, 3, 32, 32)


def test_rng_states_survive_a_weights_only_round_trip():
    random.seed(5)
    np.random.seed(7)
    torch.manual_seed(3)
    random.gauss(0, 1)  # fills python's cached gaussian
    np.random.randn(3)  # and numpy's
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.randn(4).tolist(),
                np.random.randint(0, 2**31, 3).tolist(), torch.rand(3).tolist())

    first = draw()
    set_rng_state(state)
    assert draw() == first
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1


@pytest.mark.slow
@requires_cpp
def test_a_cached_guide_that_cannot_be_loaded_safely_is_trained_again(tmp_path):
    """A cached link CNN whose checkpoint holds a numpy array (as an older version stored its
    RNG states) is refused, trained again, and gives the same run as the first time."""
    lines = []
    cfg = TrainConfig(**{**TINY, "method": "link"})

    def go(name):
        return train_run(cfg, str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                         progress=False, log=lines.append)

    first = go("a")
    (guide,) = os.listdir(tmp_path / "cache")
    path = tmp_path / "cache" / guide / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["rng"]["numpy"] = np.random.get_state()
    torch.save(ckpt, path)
    lines.clear()
    second = go("b")
    assert any("refused to load" in line and "training it again" in line for line in lines)
    assert history(second) == history(first)
    torch.load(path, weights_only=True)  # the cache holds a safe checkpoint again
