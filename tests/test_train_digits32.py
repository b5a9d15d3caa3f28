"""--data digits32: the bundled digits placed on 32x32 canvases, fixed by seeds."""
import torch

from fastattnreg.train.data import data_info_of, load_data
from fastattnreg.train.digits32 import CANVAS, DIGIT, place_digits
from fastattnreg.train.config import TrainConfig
from fastattnreg.models import create_model


def test_digits32_split_shapes_and_fixed_images():
    d = load_data("digits32", 1.0)
    small = load_data("digits", 1.0)
    assert d.x_train.shape == (1347, 1, CANVAS, CANVAS) and d.x_test.shape == (450, 1, 32, 32)
    assert torch.equal(d.y_train, small.y_train) and torch.equal(d.y_test, small.y_test)
    assert d.x_train.dtype == torch.uint8 and d.scale == 1.0 / 255.0
    again = load_data("digits32", 1.0)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.x_test, again.x_test)
    assert data_info_of("digits32") == {"img_size": 32, "in_chans": 1, "num_classes": 10}


def test_each_digit_lies_in_one_16_pixel_box_at_a_varying_place():
    digits = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    digits[:, :, 2:6, 2:6] = 16  # a bright square in the middle of every digit
    canvases = place_digits(digits, seed=5).float()
    corners = set()
    for img in canvases[:, 0]:
        bright = (img > 200).nonzero()
        lo, hi = bright.min(0).values, bright.max(0).values
        assert (hi - lo < DIGIT).all()  # inside one 16x16 box
        corners.add(tuple(lo.tolist()))
    assert len(corners) > 32  # positions vary
    assert canvases[canvases < 128].std() < 0.1 * 255  # light noise on the background


def test_digits32_model_sees_64_tokens_pooled_without_a_class_token():
    cfg = TrainConfig(data="digits32")
    model = create_model(cfg.resolved_model())
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.patch_embed.num_patches == 64 and model.num_prefix_tokens == 0
    # the classifier reads the patch-token mean; the fixed sin-cos embedding is no parameter
    assert model.config.global_pool == "avg"
    assert "pos_embed" not in dict(model.named_parameters())
