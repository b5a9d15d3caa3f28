"""Where the first block's attention looks at initialisation, for each init the trainer offers.

For every (method, position embedding) the trainer's ViT is built as a run builds it (seeds
0..S-1), and on the first 128 test images of the digits the first block's head-mean map is split
by where each patch query's attention goes: to itself, to its 8 neighbours on the patch grid
(Chebyshev distance 1), to patches farther away, and to the class token. A uniform map gives
each part its share of the 17 keys; an init with a locality prior puts more than that share on
the neighbours. No training: this measures the prior each init starts from.

Run from the repo root: `python -m benchmarks.init_locality` (prints a markdown table).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from fastattnreg.train.config import TrainConfig
from fastattnreg.train.data import load_data
from fastattnreg.train.methods import build_vit, parse_method

METHODS = ("baseline", "mimetic", "structured")
EMBEDDINGS = ("learn", "sincos")
IMAGES = 128
GRID = 4  # the digits preset's patch grid (8 px, 2 px patches)


def grid_distance(g: int) -> torch.Tensor:
    """(g*g, g*g) Chebyshev distance between the patches of a g x g grid, row-major."""
    r, c = torch.arange(g * g) // g, torch.arange(g * g) % g
    return torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())


def attention_shares(method: str, pos_embed: str, seed: int, x: torch.Tensor, info: dict) -> dict:
    """{self, neighbours, farther, cls}: the mean share of a patch query's first-block attention
    (head mean) on each group of keys, for the ViT of `method` built from `seed`."""
    torch.manual_seed(seed)
    config = TrainConfig(method=method, model_overrides={"pos_embed": pos_embed},
                         backend="reference")
    model = build_vit(config, info, parse_method(method)).eval()
    with torch.no_grad():
        first = model.attention_maps(x, export="head_mean")[0]  # (B, N, N), N = 1 + g*g
    p = model.num_prefix_tokens
    dist = grid_distance(model.patch_embed.grid_size[0])
    patches = first[:, p:, p:]  # (B, g*g, g*g) patch query -> patch key
    return {"self": float((patches * (dist == 0)).sum(-1).mean()),
            "neighbours": float((patches * (dist == 1)).sum(-1).mean()),
            "farther": float((patches * (dist >= 2)).sum(-1).mean()),
            "cls": float(first[:, p:, :p].sum(-1).mean())}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="models per row (seeds 0..S-1)")
    args = parser.parse_args(argv)
    data = load_data("digits", 0.1)
    x = data.normalise(data.x_test[:IMAGES])
    info = {"img_size": data.img_size, "in_chans": data.in_chans, "num_classes": 10}
    rows = []
    for method in METHODS:
        for pos_embed in EMBEDDINGS:
            shares = [attention_shares(method, pos_embed, s, x, info) for s in range(args.seeds)]
            rows.append({"method": method, "pos_embed": pos_embed,
                         **{k: sum(s[k] for s in shares) / len(shares) for k in shares[0]}})
    dist = grid_distance(GRID)
    keys = 1 + GRID * GRID  # the class token and the patches
    print("| init | position embedding | self | 8 neighbours | farther | class token |")
    print("|---|---|---|---|---|---|")
    print(f"| uniform map | | {1 / keys:.3f} | {(dist == 1).sum() / GRID**2 / keys:.3f} | "
          f"{(dist >= 2).sum() / GRID**2 / keys:.3f} | {1 / keys:.3f} |")
    for r in rows:
        print(f"| {r['method']} | {r['pos_embed']} | {r['self']:.3f} | {r['neighbours']:.3f} | "
              f"{r['farther']:.3f} | {r['cls']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
