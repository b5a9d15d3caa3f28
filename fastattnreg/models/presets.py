"""Named ViT configurations and create_model(name, **overrides)."""
from __future__ import annotations

from dataclasses import fields, replace

from .config import ViTConfig
from .vit import VisionTransformer

PRESETS: dict[str, ViTConfig] = {
    # 8x8 grey-scale digits (sklearn's load_digits): 4x4 grid of 2x2 patches, 17 tokens. Small
    # enough that an epoch over ~150 images takes about a second on 2 CPU cores.
    "vit_tiny_patch2_8": ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                   embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    # digits32 (32 px grey canvases of placed digits): 8x8 grid of 4x4 patches, 64 tokens, the
    # width and depth of the 8x8 digits' model. No class token: the classifier reads the mean of
    # the patch tokens, and the position embedding is the fixed 2-D sin-cos one, the setting
    # structured init needs (its class token otherwise attends to fixed patches from the second
    # block on) and the one the validation split prefers for baseline and refiner too
    # (docs/results.md). Every method on digits32 then shares one architecture.
    "vit_mini_patch4_32": ViTConfig(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                                    embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                                    class_token=False, global_pool="avg", pos_embed="sincos"),
    # 32 px colour images (CIFAR-sized): 8x8 grid of 4x4 patches, ViT-Ti width.
    "vit_tiny_patch4_32": ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192,
                                    depth=12, num_heads=3),
    # timm's ViT-Ti/S/B at 224 px (14x14 grid of 16x16 patches, 197 tokens).
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
}


def preset_config(name: str, **overrides) -> ViTConfig:
    """The named preset's ViTConfig with `overrides` (ViTConfig fields) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; known presets: {sorted(PRESETS)}")
    known = {f.name for f in fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s) {unknown} for preset {name!r}; "
                         f"fields are {sorted(known)}")
    return replace(PRESETS[name], **overrides)  # replace() re-runs the checks


def create_model(name: str, **overrides) -> VisionTransformer:
    """create_model("vit_tiny_patch4_32", attn="refiner", backend="cpp") -> VisionTransformer."""
    return VisionTransformer(preset_config(name, **overrides))
