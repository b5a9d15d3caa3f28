"""ViTConfig: every choice that shapes a VisionTransformer, checked once, with named errors."""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import check_backend_name
from ..ops.checks import check_choice

GLOBAL_POOLS = ("token", "avg")
POS_EMBEDS = ("learn", "sincos")
ATTNS = ("fused", "refiner")


@dataclass
class ViTConfig:
    img_size: int = 224  # square input images, img_size x img_size pixels
    patch_size: int = 16  # square patches; must divide img_size (grid = img_size // patch_size)
    in_chans: int = 3  # image channels (1 for grey-scale digits)
    num_classes: int = 1000  # classifier outputs; 0 leaves the head an Identity (features out)
    embed_dim: int = 192  # token width C
    depth: int = 12  # number of transformer blocks
    num_heads: int = 3  # attention heads H; embed_dim must be divisible by it (D = C / H)
    mlp_ratio: float = 4.0  # MLP hidden width = int(embed_dim * mlp_ratio)
    qkv_bias: bool = True  # bias in the qkv projection (timm's ViT default: True)
    class_token: bool = True  # prepend a learned [CLS] token (N = grid**2 + 1)
    global_pool: str = "token"  # "token": classify the [CLS] token; "avg": mean of patch tokens
    pos_embed: str = "learn"  # "learn": trainable; "sincos": fixed 2-D sin-cos buffer
    attn: str = "fused"  # "fused": FusedAttention; "refiner": RefinerAttention per block
    backend: str = "auto"  # attention backend passed to every attention layer
    drop_rate: float = 0.0  # dropout before the classifier head (timm's drop_rate)
    attn_drop_rate: float = 0.0  # dropout on attention maps (the fused kernels need 0 in training)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over the blocks
    refiner_expansion: int = 3  # attn="refiner": expanded map channels = expansion * num_heads
    refiner_kernel_size: int = 3  # attn="refiner": depthwise conv kernel over the maps

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def num_tokens(self) -> int:
        """Sequence length N seen by attention."""
        return self.grid_size**2 + self.num_prefix_tokens

    def validate(self) -> None:
        """Raises ValueError naming the field, its value and the rule it broke."""
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int; got {value!r}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0; got {self.num_classes}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"ViTConfig.patch_size={self.patch_size} must divide img_size={self.img_size} "
                f"(remainder {self.img_size % self.patch_size})"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"ViTConfig.embed_dim={self.embed_dim} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be > 0; got {self.mlp_ratio}")
        check_choice("ViTConfig.global_pool", self.global_pool, GLOBAL_POOLS)
        check_choice("ViTConfig.pos_embed", self.pos_embed, POS_EMBEDS)
        check_choice("ViTConfig.attn", self.attn, ATTNS)
        check_backend_name(self.backend)
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.global_pool='token' needs class_token=True; "
                             "use global_pool='avg' without a class token")
        if self.pos_embed == "sincos" and self.embed_dim % 4 != 0:
            raise ValueError(f"ViTConfig.pos_embed='sincos' needs embed_dim divisible by 4; "
                             f"got {self.embed_dim}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1); got {value}")
        if self.refiner_expansion < 1:
            raise ValueError(
                f"ViTConfig.refiner_expansion must be >= 1; got {self.refiner_expansion}")
        if self.refiner_kernel_size < 1 or self.refiner_kernel_size % 2 == 0:
            raise ValueError("ViTConfig.refiner_kernel_size must be a positive odd int; got "
                             f"{self.refiner_kernel_size}")
