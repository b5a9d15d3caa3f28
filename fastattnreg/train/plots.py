"""PNG plots of a comparison (matplotlib, Agg backend, no display needed).

accuracy.png   test accuracy per evaluated epoch for each method: mean over seeds, +-1 std band.
attention.png  for a few test images (one per class, first seed's final model of each ViT
               method): the last block's head-mean attention of the class token over the patch
               grid, and the attention rollout over all blocks (fastattnreg.models); for a ViT
               without class token, the attention each patch receives, averaged over queries.
               Each map is drawn over its image (grey), one patch per grid cell, half
               transparent, so the attended patches show where they lie on the digit.
               A Refiner ViT's maps are its refined attention A* (what multiplies v); A* comes
               out of a BatchNorm and may have negative entries, and then the rollout (which
               treats each map as row-stochastic weights) is left out for that model.
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

from ..models import attention_rollout
from .checkpoint import load_checkpoint, save_png
from .data import load_data
from .methods import vit_from_checkpoint

EXAMPLES = 6


def _pyplot():
    # optional dependency (the training extra), needed only to draw
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(runs: list[dict], methods: list[str], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        curves = [[h["test_acc"] for h in r["epochs"]] for r in runs if r["method"] == method]
        length = min(len(c) for c in curves)
        # the epochs every seed evaluated (--eval-every leaves the others without a test_acc)
        tested = [e for e in range(length) if all(c[e] is not None for c in curves)]
        acc = 100 * np.array([[c[e] for e in tested] for c in curves])  # (seeds, epochs)
        epochs = np.array(tested) + 1
        mean, std = acc.mean(axis=0), acc.std(axis=0)
        ax.plot(epochs, mean, label=method)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def example_images(data, count: int = EXAMPLES) -> torch.Tensor:
    """Indices of the first test image of each of the first `count` classes."""
    picks = []
    for c in range(data.num_classes):
        hits = (data.y_test == c).nonzero().flatten()
        if len(hits):
            picks.append(int(hits[0]))
        if len(picks) == count:
            break
    return torch.tensor(picks)


@torch.no_grad()
def attention_grids(model, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """((B, g, g) last-block head-mean map, (B, g, g) rollout) of the ViT for images x. The
    rollout is None when a block's map has a negative entry (a refined map A*): its rows are
    then no weights to renormalise."""
    model.eval()
    maps = model.attention_maps(x, export="head_mean")  # per block (B, N, N)
    g = model.patch_embed.grid_size[0]
    p = model.num_prefix_tokens
    roll = attention_rollout(maps) if all(bool((m >= 0).all()) for m in maps) else None
    if p >= 1:  # the class token's row over the patch keys
        last = maps[-1][:, 0, p:]
        rolled = roll[:, 0, p:] if roll is not None else None
    else:  # no class token: attention received by each patch, mean over queries
        last = maps[-1].mean(dim=1)
        rolled = roll.mean(dim=1) if roll is not None else None
    return last.reshape(-1, g, g), None if rolled is None else rolled.reshape(-1, g, g)


def overlay(ax, img: np.ndarray, grid: np.ndarray) -> None:
    """The (H, W, C) image in grey with the (g, g) map stretched over it, each grid cell covering
    its patch, half transparent."""
    h, w = img.shape[:2]
    ax.imshow(img.mean(axis=-1), cmap="gray", extent=(0, w, h, 0))
    ax.imshow(grid, cmap="viridis", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")


def plot_attention(checkpoints: dict[str, str], config, path: str) -> None:
    """attention.png at `path` for the final models in checkpoints ({method: checkpoint.pt},
    in row order) on example test images of config's data; CNN checkpoints are left out."""
    data = load_data(config.data, config.train_fraction, config.img_size, config.classes)
    idx = example_images(data)
    x = data.normalise(data.x_test[idx])
    images = (data.x_test[idx].float() * data.scale).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    rows = []  # (label, (B, g, g) array)
    for method, ckpt_path in checkpoints.items():
        ckpt = load_checkpoint(ckpt_path, f"plot of {method}")
        if "vit_config" not in ckpt:
            continue  # the CNN has no attention
        try:
            last, rolled = attention_grids(vit_from_checkpoint(ckpt), x)
        except RuntimeError as exc:  # a layer that exports no maps
            print(f"[plot] {method}: no attention maps ({exc})", file=sys.stderr)
            continue
        refined = ckpt["vit_config"].get("attn") == "refiner"  # its maps are A*
        rows.append((f"{method}\nhead-mean{' A*' if refined else ''}", last.numpy()))
        if rolled is None:
            print(f"[plot] {method}: no rollout row (its maps have negative entries)",
                  file=sys.stderr)
        else:
            rows.append((f"{method}\nrollout", rolled.numpy()))
    plt = _pyplot()
    n_rows, n_cols = 1 + len(rows), len(idx)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 1, 1.6 * n_rows),
                             squeeze=False)
    for j in range(n_cols):
        img = images[j]
        axes[0][j].imshow(img[..., 0] if img.shape[-1] == 1 else img,
                          cmap="gray" if img.shape[-1] == 1 else None)
        axes[0][j].set_title(f"class {data.classes[int(data.y_test[idx[j]])]}", fontsize=8)
        for i, (label, grids) in enumerate(rows, start=1):
            overlay(axes[i][j], img, grids[j])
            if j == 0:
                axes[i][j].set_ylabel(label, fontsize=7)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("attention over test images (first seed's final models)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # 0.35 in for the title
    save_png(fig, path)
    plt.close(fig)
