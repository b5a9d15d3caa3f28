"""VisionTransformer: a thin ViT whose attention layers are fastattnreg's fused modules.

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
blocks.i.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, fc_norm, head), so a
timm ViT of the same configuration loads strictly (load_timm_state_dict) and gives the same
outputs. As in timm, global_pool="avg" moves the final LayerNorm after pooling: `norm` is then
an Identity and `fc_norm` holds the weights.

pos_embed="sincos" stores the fixed embedding as a persistent buffer named `pos_embed` (zeros
at the class token): it is in the state dict under timm's key, so checkpoints still load both
ways, but it is not a parameter, so optimizers and "every parameter has a gradient" checks
never see it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn.attention import FusedAttention
from ..nn.refiner import RefinerAttention
from ..ops.checks import ATTENTION_EXPORTS, check_choice
from .config import ViTConfig
from .pos_embed import sincos_pos_embed_2d

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon


class PatchEmbed(nn.Module):
    """(B, in_chans, S, S) images -> (B, grid**2, C) tokens by a stride-`patch` convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)  # as timm's
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2:] != (self.img_size,) * 2:
            raise ValueError(
                f"images must be (B, {self.in_chans}, {self.img_size}, {self.img_size}); "
                f"got shape {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a sample's residual branch with probability p."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def make_attention(config: ViTConfig) -> nn.Module:
    """One attention layer of the kind config.attn names."""
    timm_args = dict(num_heads=config.num_heads, qkv_bias=config.qkv_bias,
                     attn_drop=config.attn_drop_rate, backend=config.backend)
    if config.attn == "fused":
        return FusedAttention(config.embed_dim, **timm_args)
    return RefinerAttention(config.embed_dim, expansion=config.refiner_expansion,
                            kernel_size=config.refiner_kernel_size, **timm_args)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = make_attention(config)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT classifier built from a ViTConfig; forward(images (B, C, S, S)) -> logits (B, K)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig; got {type(config).__name__}")
        config.validate()  # fields may have been changed after construction
        self.config = config
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.num_prefix_tokens = config.num_prefix_tokens
        self.global_pool = config.global_pool
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        n_tokens = config.num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        if config.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        else:
            fixed = sincos_pos_embed_2d(config.grid_size, dim)  # (g*g, C)
            fixed = torch.cat([fixed.new_zeros(self.num_prefix_tokens, dim), fixed])
            self.register_buffer("pos_embed", fixed.unsqueeze(0))  # (1, N, C), persistent
        # Stochastic depth rising linearly from 0 to drop_path_rate (plain floats: no tensor,
        # so the model also builds on the meta device).
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[Block(config, rate) for rate in rates])
        pool_then_norm = config.global_pool == "avg"  # timm's fc_norm rule
        self.norm = nn.Identity() if pool_then_norm else nn.LayerNorm(dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS) if pool_then_norm else nn.Identity()
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's default ViT init: truncated normal (std .02) Linear weights and learned
        position embedding, zero biases, class token ~ N(0, 1e-6); convolution, norms and the
        attention layers' own extra parameters keep their PyTorch defaults."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) images -> (B, N, C) tokens after the last block and `norm`."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) tokens -> (B, num_classes) logits (or (B, C) pooled features)."""
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_maps(self, x: torch.Tensor, export: str = "head_mean") -> list[torch.Tensor]:
        """One attention map per block for images x, exported by the fused attention kernels
        (softmax maps; for RefinerAttention the refined map A* that multiplies v).

        export: "full" (B, H, N, N), "head_mean" (B, N, N) or "cls" (B, H, N). The maps carry
        their autograd graph when grad mode is on. Every layer's previous `export` and `maps`
        are restored afterwards, so a regulariser that set them keeps its setting.
        """
        check_choice("export", export, [e for e in ATTENTION_EXPORTS if e is not None])
        layers = [blk.attn for blk in self.blocks]
        for layer in layers:
            if not hasattr(layer, "export"):
                raise RuntimeError(f"{type(layer).__name__} does not export attention maps")
        saved = [(layer.export, layer.maps) for layer in layers]
        try:
            for layer in layers:
                layer.export = export
                layer.maps = None
            self.forward_features(x)
            maps = [layer.maps for layer in layers]
        finally:
            for layer, (old_export, old_maps) in zip(layers, saved):
                layer.export, layer.maps = old_export, old_maps
        if any(m is None for m in maps):
            raise RuntimeError("an attention layer ran without leaving its maps on `.maps`")
        return maps


def load_timm_state_dict(model: VisionTransformer, state_dict, strict: bool = True):
    """Loads a timm VisionTransformer's weights (a state dict or the timm module itself).

    Names are timm's, so the keys map one to one; a checkpoint wrapped as {"model": sd} or
    {"state_dict": sd} is unwrapped. Shape mismatches raise a ValueError listing them (a
    different configuration: grid, width, classes), before anything is copied. Returns the
    missing/unexpected keys of nn.Module.load_state_dict (empty when strict).
    """
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    own = model.state_dict()
    bad = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
           for key, value in state_dict.items()
           if key in own and tuple(value.shape) != tuple(own[key].shape)]
    if bad:
        raise ValueError("timm state dict does not fit this ViTConfig (shape mismatch): "
                         + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5
                                                 else ""))
    return model.load_state_dict(state_dict, strict=strict)
