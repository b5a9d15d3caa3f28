"""The torchvision CNN guides of the `link` method (AAL): a torchvision CNN read from a local
weights file (never downloaded), and the input transform it needs. The small CNN that `link`
trains itself is fastattnreg.models.SmallCNN."""
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


def torchvision_cnn(arch: str, weights_path: str) -> nn.Module:
    """torchvision.models.<arch>(weights=None) with the state dict at weights_path loaded."""
    if arch not in TORCHVISION_LAYERS:
        raise ValueError(f"--link-cnn torchvision:{arch}: architecture must be one of "
                         f"{sorted(TORCHVISION_LAYERS)}")
    if not os.path.isfile(weights_path):
        raise ValueError(f"--link-cnn torchvision:{arch}:{weights_path}: no weights file there "
                         "(this tool never downloads weights)")
    import torchvision  # optional dependency, needed only for --link-cnn torchvision:...
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
