"""ViT models built on fastattnreg's attention layers, with timm's parameter names, and the
small CNN that the `link` method uses as its guide."""
from .config import ViTConfig
from .pos_embed import sincos_pos_embed_2d
from .presets import PRESETS, create_model, preset_config
from .rollout import attention_rollout, cls_rollout_grid
from .small_cnn import SMALL_CNN_LAYERS, SmallCNN
from .vit import VisionTransformer, load_timm_state_dict

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "PRESETS",
    "create_model",
    "preset_config",
    "load_timm_state_dict",
    "attention_rollout",
    "cls_rollout_grid",
    "sincos_pos_embed_2d",
    "SmallCNN",
    "SMALL_CNN_LAYERS",
]
