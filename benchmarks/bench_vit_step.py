"""Benchmark of one ViT training step: fastattnreg's VisionTransformer against timm's.

Providers, each a freshly initialised model of the preset's configuration, float32, in
training mode, with a batch of random images and labels:
  cpp        fastattnreg.models VisionTransformer, backend="cpp" (fused C++ attention)
  reference  the same model, backend="reference" (eager attention that materialises P)
  timm       timm.models.VisionTransformer of the same configuration (timm's own Attention,
             which calls torch's scaled_dot_product_attention: no maps)
Modes: "fwd" = the forward to the logits under no_grad; "fwd+bwd" = one training step:
cross-entropy forward, backward and AdamW step (lr 1e-4, gradients zeroed in place after the
step); "bwd" = the backward and AdamW step alone. The optimizer state and gradient buffers
are allocated when the model is prepared (one AdamW step on zero gradients), so peak extra
memory counts what a step adds in steady state: activations, their gradients and temporaries,
less what a batch-1 step needs (the harness's warm-up convention; the warm-up reuses the same
model, see prepared_model). Measured by the VmHWM of a fresh process, it varies by about
+-20 MB between runs on this machine (glibc arenas), so small differences mean nothing.

Presets run as name:batch pairs (--presets). The preset reaches the harness's memory
subprocess as FASTATTNREG_BENCH_VIT=<preset> (set around each run, restored after); the CSV
`op` column is "vit_step_<preset>" and `shape` is the batch size. Under each table: the
cpp/timm and cpp/reference ratios of time and memory.

--precision bf16 runs every provider's forward and loss under torch.autocast in bfloat16, as
`train --precision bf16` does (weights, gradients and AdamW stay float32; --dtype stays
float32): the matmuls run in bf16, and so does the cpp provider's attention (on AMX tiles
where the CPU has them), timm's SDPA and the reference's eager attention. It reaches the memory
subprocess as FASTATTNREG_BENCH_PRECISION; the CSV `op` gets the suffix "_autocast_bf16".

Run from the repo root: `python -m benchmarks.bench_vit_step`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Provider, Result, Shape
from fastattnreg.models import PRESETS, VisionTransformer, preset_config
from fastattnreg.train.trainer import autocast_for

ENV_VAR = "FASTATTNREG_BENCH_VIT"
PRECISION_VAR = "FASTATTNREG_BENCH_PRECISION"
PRECISIONS = ("fp32", "bf16")
DEFAULT_PRESETS = "vit_tiny_patch2_8:32,vit_tiny_patch4_32:8,vit_tiny_patch16_224:4"
DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "vit_step.csv"
DEFAULT_MODES = "fwd,fwd+bwd"
RATIOS = (("cpp", "timm"), ("cpp", "reference"))


def current_preset() -> str:
    name = os.environ.get(ENV_VAR, "vit_tiny_patch2_8")
    if name not in PRESETS:
        raise ValueError(f"{ENV_VAR} must name a preset {sorted(PRESETS)}; got {name!r}")
    return name


def current_precision() -> str:
    value = os.environ.get(PRECISION_VAR, "fp32")
    if value not in PRECISIONS:
        raise ValueError(f"{PRECISION_VAR} must be one of {PRECISIONS}; got {value!r}")
    return value


def timm_model(config):
    """timm's VisionTransformer with the same configuration (no weights downloaded)."""
    import timm

    if config.pos_embed != "learn" or config.attn != "fused":
        raise ValueError("the timm provider builds pos_embed='learn', attn='fused' models only")
    return timm.models.VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
        class_token=config.class_token, global_pool=config.global_pool)


def prepared_model(kind: str, config, dtype: torch.dtype, device: torch.device):
    """(model, AdamW) for provider `kind`, in steady state: gradient buffers and AdamW moments
    already allocated (one step on zero gradients).

    The last one per provider is kept and reused by the next make() of the same preset, dtype
    and device. Why: the harness's memory subprocess makes the real case and then a batch-1
    warm-up case; a second model plus its optimizer state (350 MB for ViT-S) would set the
    high-water mark above the measured step and hide it (ViT-S read +3 MB before this).
    """
    key = (config, dtype, device)
    cached = _PREPARED.get(kind)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    _PREPARED.pop(kind, None)
    if kind == "timm":
        model = timm_model(config)
    else:
        model = VisionTransformer(dataclasses.replace(config, backend=kind))
    model = model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    _PREPARED[kind] = (key, model, opt)
    return model, opt


_PREPARED: dict = {}  # provider -> ((config, dtype, device), model, optimizer)


def step_case(model: torch.nn.Module, opt: torch.optim.Optimizer, config, batch: int,
              dtype: torch.dtype, device: torch.device, precision: str = "fp32") -> Case:
    """forward -> loss (under autocast for precision "bf16"); backward(loss) -> backward +
    AdamW step + in-place zero_grad."""
    images = torch.randn(batch, config.in_chans, config.img_size, config.img_size,
                         dtype=dtype, device=device)
    labels = torch.randint(max(config.num_classes, 1), (batch,), device=device)

    def forward():
        with autocast_for(precision, device):
            if not torch.is_grad_enabled():  # mode "fwd": inference only
                return model(images)
            return F.cross_entropy(model(images), labels)

    def backward(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return Case(forward, backward)


def _make(kind: str):
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
        (batch,) = shape
        config = preset_config(current_preset())
        model, opt = prepared_model(kind, config, dtype, device)
        return step_case(model, opt, config, batch, dtype, device, current_precision())

    return make


PROVIDERS = {name: Provider(name, _make(name)) for name in ("cpp", "reference", "timm")}


def print_ratios(shape: Shape, results: Sequence[Result]) -> None:
    """cpp against timm and the reference, per mode: time, and memory where measured."""
    by_key = {(r.provider, r.mode): r for r in results}
    for mode in sorted({r.mode for r in results}):
        parts = []
        for num, den in RATIOS:
            a, b = by_key.get((num, mode)), by_key.get((den, mode))
            if a is None or b is None:
                continue
            text = f"{num}/{den} time {a.median_ms / b.median_ms:.2f}"
            if a.peak_extra_mb is not None and b.peak_extra_mb:
                text += f", memory {a.peak_extra_mb / b.peak_extra_mb:.2f}"
            parts.append(text)
        if parts:
            print(f"ratios {current_preset()} batch {shape[0]} {mode}: " + "; ".join(parts),
                  flush=True)


def parse_presets(text: str) -> list[tuple[str, int]]:
    """'vit_tiny_patch2_8:32,vit_tiny_patch16_224:4' -> [(name, batch), ...]."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, batch = part.partition(":")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        if not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"presets are name:batch with batch >= 1; got {part!r}")
        pairs.append((name, int(batch)))
    if not pairs:
        raise ValueError("--presets is empty")
    return pairs


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_vit_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_shapes="", provider_names=list(PROVIDERS),
                            default_csv=DEFAULT_CSV)
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated preset:batch pairs (default {DEFAULT_PRESETS})")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="bf16: forward and loss under torch.autocast in bfloat16")
    parser.set_defaults(modes=DEFAULT_MODES, repeats=7, warmup=2)
    args = parser.parse_args(argv)
    if args.shapes:
        parser.error("bench_vit_step takes --presets name:batch, not --shapes")
    try:
        opts = harness.resolve_common_args(args, list(PROVIDERS))
        presets = parse_presets(args.presets)
    except ValueError as exc:
        parser.error(str(exc))
    opts.pop("shapes")
    providers = [PROVIDERS[name] for name in opts.pop("provider_names")]
    if args.precision == "bf16" and opts["dtype"] != torch.float32:
        parser.error("--precision bf16 autocasts float32 models; leave --dtype at float32")
    suffix = "_autocast_bf16" if args.precision == "bf16" else ""
    results = {}
    for name, batch in presets:
        with harness.env_setting(ENV_VAR, name), \
                harness.env_setting(PRECISION_VAR, args.precision):
            results[name] = harness.run_benchmark(
                f"vit_step_{name}{suffix}", providers, [(batch,)],
                registry="benchmarks.bench_vit_step", warmup_shape=lambda shape: (1,),
                after_shape=print_ratios, **opts)
    return results


if __name__ == "__main__":
    main()
