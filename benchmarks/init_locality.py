"""Where the first block's attention looks at initialisation, for each init the trainer offers.

For every (method, position embedding) the trainer's ViT is built as a run builds it (seeds
0..S-1), and on the first 128 test images of the digits the first block's head-mean map is split
by where each patch query's attention goes: to itself, to its 8 neighbours on the patch grid
(Chebyshev distance 1), to patches farther away, and to the class token. A uniform map gives
each part its share of the 17 keys; an init with a locality prior puts more than that share on
the neighbours. No training: this measures the prior each init starts from.

With `--class-token` it measures instead where the class token looks in every block: the
largest weight of its row (mean over images, heads and seeds; a uniform row gives 1/N), on the
8x8 digits and on digits32 built with a class token. Structured init fits the patch rows only;
from the second block on, the class token carries content, its query goes through the fitted
W_q, and its row concentrates on a few fixed keys instead of pooling the image.

Run from the repo root: `python -m benchmarks.init_locality [--class-token]` (prints a markdown
table).
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


def class_row_peaks(method: str, data_name: str, seed: int, x: torch.Tensor,
                    info: dict) -> tuple[list, int]:
    """([per block: the mean largest weight of the class token's row (B, H, N) at init], N) for
    the ViT of `method` on `data_name`, built with a class token and read out from it."""
    torch.manual_seed(seed)
    config = TrainConfig(method=method, data=data_name, backend="reference",
                         model_overrides={"class_token": True, "global_pool": "token"})
    model = build_vit(config, info, parse_method(method)).eval()
    with torch.no_grad():
        maps = model.attention_maps(x, export="cls")  # per block (B, H, N)
    return [float(m.amax(dim=-1).mean()) for m in maps], maps[0].shape[-1]


def class_token_table(seeds: int) -> list[dict]:
    """Prints and returns one row per (data, method): the class row's peak in each block."""
    rows = []
    for data_name in ("digits", "digits32"):
        data = load_data(data_name, 0.1)
        x = data.normalise(data.x_test[:IMAGES])
        info = {"img_size": data.img_size, "in_chans": data.in_chans, "num_classes": 10}
        for method in METHODS:
            runs = [class_row_peaks(method, data_name, s, x, info) for s in range(seeds)]
            peaks = [sum(p[b] for p, _ in runs) / seeds for b in range(len(runs[0][0]))]
            rows.append({"data": data_name, "method": method, "tokens": runs[0][1],
                         "peaks": peaks})
    blocks = len(rows[0]["peaks"])
    print("| data | init | uniform row | " + " | ".join(f"block {b + 1}" for b in range(blocks)) + " |")
    print("|---" * (3 + blocks) + "|")
    for r in rows:
        print(f"| {r['data']} | {r['method']} | {1 / r['tokens']:.3f} | "
              + " | ".join(f"{p:.3f}" for p in r["peaks"]) + " |")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="models per row (seeds 0..S-1)")
    parser.add_argument("--class-token", action="store_true",
                        help="the class token's row in every block instead (a second table)")
    args = parser.parse_args(argv)
    if args.class_token:
        return class_token_table(args.seeds)
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
