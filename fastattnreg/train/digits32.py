"""digits32: the bundled 8x8 digits placed at random positions on a 32x32 canvas.

Each digit (scikit-learn's load_digits, values 0..16) is upscaled to 16x16 (bilinear), placed at
a uniformly random offset (0..16 on each axis) on a black 32x32 canvas, and light Gaussian noise
(std NOISE_STD of the pixel range) is added; pixels are clipped to [0, 1] and stored as uint8
(scale 1/255). A ViT with 4-pixel patches sees an 8x8 grid, 64 tokens: where the digit is varies,
so translation and locality matter, unlike the 8x8 digits' 16 tokens, which a ViT sees whole.

Everything is fixed by seeds independent of --seed: the train/test split is the digits' own
(25% stratified, random_state=0), the placements and noise of the training images come from
TRAIN_SEED and those of the test images from TEST_SEED, so every method and seed sees the same
images. Nothing is downloaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CANVAS = 32
DIGIT = 16
NOISE_STD = 0.05
TRAIN_SEED, TEST_SEED = 1, 2


def place_digits(digits: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, 1, 8, 8) uint8 digits (0..16) -> (N, 1, 32, 32) uint8 canvases (0..255)."""
    gen = torch.Generator().manual_seed(seed)
    n = digits.shape[0]
    up = F.interpolate(digits.float() / 16.0, size=(DIGIT, DIGIT), mode="bilinear",
                       align_corners=False)  # (N, 1, 16, 16) in [0, 1]
    offsets = torch.randint(0, CANVAS - DIGIT + 1, (n, 2), generator=gen)
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    for i, (r, c) in enumerate(offsets.tolist()):
        canvas[i, :, r:r + DIGIT, c:c + DIGIT] = up[i]
    canvas += NOISE_STD * torch.randn(canvas.shape, generator=gen)
    return (canvas.clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def make_digits32(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' train and test images (N, 1, 8, 8) uint8 -> their 32x32 canvases."""
    return place_digits(x_train, TRAIN_SEED), place_digits(x_test, TEST_SEED)
