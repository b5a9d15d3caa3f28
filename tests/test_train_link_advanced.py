"""The link_advanced method: the links a `link` run of the same seed ends with, cut to the k
strongest per CNN channel (AttentionLink.advanced), guide a fresh ViT with the link run's initial
weights."""
import os

import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train.build import build  # noqa: E402
from fastattnreg.train.cli import main  # noqa: E402
from fastattnreg.train.config import TrainConfig  # noqa: E402
from fastattnreg.train.data import load_data  # noqa: E402
from fastattnreg.train.dist import DistContext  # noqa: E402
from fastattnreg.train.methods import MethodError, parse_method  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import requires_cpp  # noqa: E402
from train_helpers import TINY, TINY_ARGS, model_state, quiet, run  # noqa: E402


def _build(cfg, cache):
    data = load_data(cfg.data, cfg.train_fraction)
    return build(cfg, data, cache_dir=str(cache), ctx=DistContext(), log=quiet, progress=False,
                 train_guide=train_run)


def test_link_advanced_parses_and_combines_like_link():
    assert parse_method("structured+link_advanced").basic_link_name == "structured+link"
    with pytest.raises(MethodError, match="refiner does not combine with link_advanced"):
        parse_method("refiner+link_advanced")
    with pytest.raises(MethodError, match="choose one"):
        parse_method("link+link_advanced")


@pytest.mark.slow
@requires_cpp
def test_link_advanced_keeps_the_k_strongest_trained_links(tmp_path):
    k = 3
    cfg = TrainConfig(**{**TINY, "method": "link_advanced", "link_advanced_k": k})
    built = _build(cfg, tmp_path / "cache")
    names = sorted(os.listdir(tmp_path / "cache"))
    assert [n.split("-")[0] for n in names] == ["cnn", "link"]  # the guide and the link run
    basic = torch.load(tmp_path / "cache" / names[1] / "checkpoint.pt", weights_only=True)
    trained = basic["task"]["link.links.weight"]  # (C, M*H, 1, 1)
    link = built.task.link
    mask = link.link_mask.flatten(1)  # (C, M*H)
    assert mask.shape == trained.flatten(1).shape
    assert mask.sum(dim=1).tolist() == [k] * mask.shape[0]  # k links per CNN channel
    kept = trained.flatten(1).abs().topk(k, dim=1).indices
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, kept, 1.0))
    assert torch.equal(link.link_weight().flatten(1), trained.flatten(1) * mask)
    assert torch.equal(link.links.bias, basic["task"]["link.links.bias"])
    assert link.links.weight.requires_grad  # the kept links go on training
    # the ViT starts where the link run started: the same seed gives the same initial weights
    plain = _build(cfg.with_(method="link"), tmp_path / "cache").model.state_dict()
    assert all(torch.equal(v, built.model.state_dict()[key]) for key, v in plain.items())
    assert not torch.equal(model_state(tmp_path / "cache" / names[1])["head.weight"],
                           plain["head.weight"])  # (the link run itself trained)


@pytest.mark.slow
@requires_cpp
def test_link_advanced_trains_and_its_masked_links_stay_zero(tmp_path):
    m = run(tmp_path, method="link_advanced", epochs=2, link_advanced_k=2)
    assert m["status"] == "complete" and m["epochs"][-1]["train_reg"] > 0
    task = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["task"]
    weight, mask = task["link.links.weight"], task["link.link_mask"]
    assert torch.equal(weight * (1 - mask), torch.zeros_like(weight))  # no gradient leaks
    assert mask.flatten(1).sum(dim=1).eq(2).all()


@pytest.mark.slow
@requires_cpp
def test_compare_trains_the_shared_link_run_once(tmp_path, capsys):
    argv = ["compare", "--methods", "link,link_advanced", "--seeds", "0", "--epochs", "1",
            "--cnn-epochs", "1", "--time-epochs", "0", "--link-advanced-k", "2", *TINY_ARGS, "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "link seed 0: also link_advanced's first run (cached)" in err
    assert "training link guide" not in err and "using link guide" in err
    (shared,) = [n for n in os.listdir(tmp_path / "cache") if n.startswith("link-")]
    run = torch.load(tmp_path / "out" / "runs" / "link-s0" / "checkpoint.pt", weights_only=True)
    cached = torch.load(tmp_path / "cache" / shared / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, cached["model"][k]) for k, v in run["model"].items())
    assert torch.equal(run["task"]["link.links.weight"], cached["task"]["link.links.weight"])
