"""Shared inputs of test_vit.py and test_init.py: real digit images and small timm ViTs."""
import torch


def digits_batch(n: int):
    """n of sklearn's 8x8 digits (bundled with the wheel: no download) as (n, 1, 8, 8) floats
    in [0, 1] and their labels."""
    from sklearn.datasets import load_digits  # an optional dependency (the test extra)

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target[:n], dtype=torch.long)


def small_timm_vit(class_token: bool, global_pool: str, **kwargs):
    """timm's own VisionTransformer at the tests' SMALL size (no weights downloaded)."""
    import timm  # an optional dependency (the test extra)

    cfg = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=2,
               num_heads=4, class_token=class_token, global_pool=global_pool)
    cfg.update(kwargs)
    return timm.models.VisionTransformer(**cfg)
