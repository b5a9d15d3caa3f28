"""--val-fraction: a stratified validation split held out of the training subset (never the test
split), fixed whatever the seed, and evaluated on instead of the test split."""
import pytest
import torch

pytest.importorskip("sklearn")
from fastattnreg.train.config import TUNED_LR, TrainConfig, default_lr  # noqa: E402
from fastattnreg.train.data import DataError, load_data  # noqa: E402
from fastattnreg.train.methods import parse_method  # noqa: E402
from fastattnreg.train.trainer import train_run  # noqa: E402
from conftest import requires_cpp  # noqa: E402


def _rows(x: torch.Tensor) -> set:
    return {bytes(img.flatten().tolist()) for img in x}


def test_validation_images_come_from_the_training_subset_only():
    whole = load_data("digits", 0.1)
    held = load_data("digits", 0.1, val_fraction=0.2)
    assert (len(held.y_train), len(held.y_test)) == (108, 27)
    assert held.eval_split == "validation" and whole.eval_split == "test"
    assert held.describe()["eval_split"] == "validation"
    # the two parts are disjoint and together are exactly the training subset
    fit, val = _rows(held.x_train), _rows(held.x_test)
    assert not fit & val
    assert sorted(held.y_train.tolist() + held.y_test.tolist()) == sorted(whole.y_train.tolist())
    assert (fit | val) <= _rows(whole.x_train)
    assert not val & _rows(whole.x_test)  # no test image is used for validation
    counts = torch.bincount(held.y_test, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3  # stratified: 27 images over 10 classes
    again = load_data("digits", 0.1, val_fraction=0.2)
    assert torch.equal(again.x_test, held.x_test)  # fixed split


def test_validation_split_of_a_class_subset():
    held = load_data("digits", 0.1, classes="5-9", val_fraction=0.3)
    assert held.num_classes == 5 and set(held.y_test.tolist()) == set(range(5))
    assert len(held.y_train) + len(held.y_test) == len(load_data("digits", 0.1,
                                                                 classes="5-9").y_train)


@pytest.mark.parametrize("fraction, match", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"),
                                             (0.01, "holds out 1 of the 135"),
                                             (0.95, "both parts")])
def test_bad_validation_fractions_are_refused(fraction, match):
    with pytest.raises(DataError, match=match):
        load_data("digits", 0.1, val_fraction=fraction)


@pytest.mark.slow
@requires_cpp
def test_a_run_with_a_validation_split_evaluates_on_it(tmp_path):
    cfg = TrainConfig(train_fraction=0.05, val_fraction=0.3, epochs=1, warmup_epochs=0,
                      model_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2})
    m = train_run(cfg, str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                  progress=False, log=lambda _line: None)
    assert m["data"]["eval_split"] == "validation"
    assert (m["data"]["train_images"], m["data"]["test_images"]) == (47, 20)
    acc = m["final"]["test_acc"]
    assert acc * 20 == pytest.approx(round(acc * 20), abs=1e-9)  # a count over 20 images


def test_default_learning_rates_follow_the_tuned_table():
    expected = {"baseline": "baseline", "structured": "structured", "mimetic": "mimetic",
                "refiner": "refiner", "finetune": "finetune", "gta": "finetune",
                "structured+gta": "finetune", "link": "baseline", "link_advanced": "baseline",
                "structured+link": "structured", "mimetic+refiner": "mimetic"}
    for method, row in expected.items():
        assert default_lr(parse_method(method)) == TUNED_LR[row], method
