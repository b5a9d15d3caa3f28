"""The frozen CNN guides of the `link` method (AAL): a small CNN trained by this tool, or a
torchvision CNN read from a local weights file (never downloaded)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# torchvision architectures accepted by --link-cnn torchvision:ARCH:WEIGHTS and the layers used
# by default (the outputs of these named submodules become the CNN maps).
TORCHVISION_LAYERS = {
    "resnet18": ("layer1", "layer2"), "resnet34": ("layer1", "layer2"),
    "resnet50": ("layer1", "layer2"), "mobilenet_v2": ("features.3", "features.6"),
}
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


def torchvision_cnn(arch: str, weights_path: str) -> nn.Module:
    """torchvision.models.<arch>(weights=None) with the state dict at weights_path loaded."""
    if arch not in TORCHVISION_LAYERS:
        raise ValueError(f"--link-cnn torchvision:{arch}: architecture must be one of "
                         f"{sorted(TORCHVISION_LAYERS)}")
    if not os.path.isfile(weights_path):
        raise ValueError(f"--link-cnn torchvision:{arch}:{weights_path}: no weights file there "
                         "(this tool never downloads weights)")
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - one line for the command line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--link-cnn torchvision:{arch}:{weights_path}: cannot load the "
                         f"weights ({msg})") from None
    return model


class TorchvisionInput(nn.Module):
    """The input a torchvision CNN expects from the ViT's batch: grey images repeated to RGB
    and images smaller than 32 px upsampled (bilinear) to 32, so that layer1/layer2 still have
    a spatial extent. (B, C, S, S) -> (B, 3, max(S, 32), max(S, 32))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x
