"""SmallCNN: the small convolutional classifier that the `link` method trains as its frozen
guide (and the `cnn` method trains alone, for reference)."""
from __future__ import annotations

import torch
from torch import nn

# The submodules whose outputs AttentionLink reads by default (the CNN maps).
SMALL_CNN_LAYERS = ("layer2", "layer3")


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (widths w, 2w, 4w; 2x2 max-pool before the third when the
    image is at least 8 px), global average pooling and a linear classifier.
    Sized for 8x8 digits and 32 px images alike; `link` reads layer2 and layer3 by default."""

    def __init__(self, in_chans: int, num_classes: int, img_size: int, width: int = 32) -> None:
        super().__init__()
        self.config = {"in_chans": in_chans, "num_classes": num_classes, "img_size": img_size,
                       "width": width}  # saved in checkpoints to rebuild the CNN
        self.layer1 = _conv_bn(in_chans, width)
        self.layer2 = _conv_bn(width, 2 * width)
        self.pool = nn.MaxPool2d(2) if img_size >= 8 else nn.Identity()
        self.layer3 = _conv_bn(2 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, num_classes)
        x = self.layer3(self.pool(self.layer2(self.layer1(x))))
        return self.head(x.mean(dim=(2, 3)))
