"""A method's training epoch timed on the fused backend and on the plain-PyTorch reference path,
in one process, epoch by epoch in turn (compare's epoch_time_fused_s / epoch_time_reference_s
columns: what the kernels save in the user's own job).

The task of the method's first seed is built as its run builds it (cached guides are read, not
trained again) and trained for 1 + `rounds` epochs on each path, alternating fused, reference,
fused, reference, ...: the first epoch of each path warms it up (allocator, kernel dispatch) and
is not counted, and alternating keeps a machine whose speed drifts from favouring either path.
Every attention layer reads its `backend` attribute on each call, so one model switches paths
between epochs; the timed epochs train the model further, which does not change an epoch's cost.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from ..backend import resolve
from .build import build
from .trainer import new_state, train_epoch, train_run
from .data import load_data


def attention_layers(module: nn.Module) -> list[nn.Module]:
    """Every attention layer in `module` (a string `backend` attribute: FusedAttention,
    RefinerAttention), a GTA source's included."""
    return [m for m in module.modules() if isinstance(getattr(m, "backend", None), str)]


def time_backends(config, *, cache_dir: str, ctx, log, rounds: int = 2) -> dict:
    """{"fused_backend": the backend the run's layers resolve to, "fused_s", "reference_s": the
    median of `rounds` training epochs on each path}; the times are None for a task without
    attention layers (the CNN). ValueError when rounds < 1."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 timed epochs per backend; got {rounds}")
    data = load_data(config.data, config.train_fraction, config.img_size, config.classes,
                     config.val_fraction)
    built = build(config, data, cache_dir=cache_dir, ctx=ctx, log=log, progress=False,
                  train_guide=train_run)
    layers = attention_layers(built.task)
    if not layers:
        return {"fused_backend": "", "fused_s": None, "reference_s": None}
    own = [m.backend for m in layers]  # as the run builds them (a refiner may be on reference)
    state = new_state(built, config, len(data.y_train), ctx)
    times: dict = {"fused_s": [], "reference_s": []}
    name = f"{config.method}-timing"
    for epoch in range(2 * (rounds + 1)):
        label = "fused_s" if epoch % 2 == 0 else "reference_s"
        for m, backend in zip(layers, own):
            m.backend = backend if label == "fused_s" else "reference"
        row = train_epoch(state, data, config, ctx, epoch, name, first_of_process=False)
        if epoch >= 2:
            times[label].append(row["epoch_time_s"])
    fused = resolve(own[0], torch.device(ctx.device))
    return {"fused_backend": fused, **{k: statistics.median(v) for k, v in times.items()}}
