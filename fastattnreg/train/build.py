"""Builds what one run trains: the model, the task module around it (methods.py) and, for gta
and link, the frozen guide (a source ViT or a CNN), training and caching guides when asked.

Cached guides live in `cache_dir/<kind>-<hash of their TrainConfig>/`, each an ordinary run
folder (checkpoint.pt, metrics.json, log.csv) written by the same trainer; a folder counts as a
cache hit only when its metrics.json says status "complete", so a killed guide run is resumed,
never used half-trained, and only when that metrics.json records the same configuration.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_json, save_torch, seed_everything
from ..models.small_cnn import SMALL_CNN_LAYERS, SmallCNN
from .config import TrainConfig
from .data import data_info_of, other_classes
from .dist import DistContext
from .guide_cnns import TORCHVISION_LAYERS, TorchvisionInput, torchvision_cnn
from .methods import (LINKS, MethodError, MethodSpec, PlainTask, advance_links, build_vit,
                      gta_student, make_gta_task, make_link_task, new_head, parse_method,
                      vit_from_checkpoint)


class GuideTrainer(Protocol):
    """How build() trains a guide that is not cached: trainer.train_run, passed in by the
    trainer (the trainer builds its runs with build(), so build() cannot import it)."""

    def __call__(self, config: TrainConfig, out_dir: str, *, resume: bool, ctx: DistContext,
                 log: Callable[[str], None], progress: bool, name: str,
                 cache_dir: str) -> dict: ...


@dataclass
class Built:
    task: nn.Module  # forward(x) -> (logits, regulariser); what the optimizer trains
    model: nn.Module  # what is evaluated and saved as "model" (the ViT, or the CNN)
    spec: MethodSpec
    kind: str  # "vit" | "cnn"


def data_info(data) -> dict:
    return {"img_size": data.img_size, "in_chans": data.in_chans,
            "num_classes": data.num_classes}


def build(config: TrainConfig, data, *, cache_dir: str, ctx: DistContext,
          log: Callable[[str], None], progress: bool, train_guide: GuideTrainer) -> Built:
    """The model and task of `config` on `data`.

    Guides come first (training one draws from the global RNGs, loading a cached one does
    not), then the RNGs are seeded with config.seed and the models are built: a run starts from
    the same numbers whether its guide was trained now or found in the cache. A guide missing
    from cache_dir is trained there by train_guide.
    """
    spec = parse_method(config.method)
    info = data_info(data)
    source = cnn_guide = trained_links = None
    if spec.regulariser in ("gta", "finetune"):
        source = gta_source(config, data, spec, cache_dir=cache_dir, ctx=ctx, log=log,
                            progress=progress, train_guide=train_guide)
    elif spec.regulariser in LINKS:
        cnn_guide = link_cnn(config, data, cache_dir=cache_dir, ctx=ctx, log=log,
                             progress=progress, train_guide=train_guide)
    if spec.regulariser == "link_advanced":
        trained_links = basic_links(config, spec, cache_dir=cache_dir, ctx=ctx, log=log,
                                    progress=progress, train_guide=train_guide)
    seed_everything(config.seed)
    if spec.cnn:
        cnn = SmallCNN(info["in_chans"], info["num_classes"], info["img_size"])
        return Built(PlainTask(cnn), cnn, spec, "cnn")
    if source is not None:
        student = gta_student(source)
        if config.gta_source == "auto" and source_classes(config) != config.classes:
            new_head(student, info["num_classes"])  # the source's labels are not the task's
        if spec.regulariser == "finetune":
            return Built(PlainTask(student), student, spec, "vit")
        return Built(make_gta_task(student, source, config), student, spec, "vit")
    vit = build_vit(config, info, spec)
    if cnn_guide is not None:
        cnn, layers, cnn_input = cnn_guide
        task = make_link_task(vit, cnn, layers, cnn_input, config, info)
        if trained_links is not None:
            try:
                task = advance_links(task, config.link_advanced_k, trained_links)
            except ValueError as exc:
                raise MethodError(f"--link-advanced-k: {exc}") from None
        return Built(task, vit, spec, "vit")
    return Built(PlainTask(vit), vit, spec, "vit")


# ------------------------------------------------------------------------------ guides

GUIDE_FIELDS = ("gta_source", "gta_weight", "gta_kind", "gta_rows", "gta_source_epochs",
                "gta_source_seed", "gta_source_classes", "link_cnn", "link_weight", "link_decay",
                "link_cnn_layers", "link_advanced_k", "cnn_epochs", "cnn_lr")
VIT_FIELDS = ("model", "model_overrides", "backend", "structured_method", "structured_kernel")


def _reset(config: TrainConfig, names) -> dict:
    """Fields that cannot change a guide, set to their defaults so they stay out of its key."""
    default = TrainConfig()
    return {n: getattr(default, n) for n in names}


def source_classes(config: TrainConfig) -> str:
    """The classes the source of gta / finetune trains on (a --classes value): by default those
    the task does not have, so that the source never sees the task's labels."""
    if config.gta_source_classes == "all":
        return ""
    if config.gta_source_classes == "other":
        if not config.classes:
            raise MethodError(f"--method {config.method}: its source trains on the classes the "
                              "task does not have (--gta-source-classes other), and the task "
                              "has every class: give the task's classes (e.g. --classes 5-9) "
                              "or let the source see them (--gta-source-classes all)")
        return other_classes(config.classes, data_info_of(config.data, config.img_size)
                             ["num_classes"])
    return config.gta_source_classes


def source_config(config: TrainConfig, spec: MethodSpec) -> TrainConfig:
    """The source of gta / finetune: the scratch part of the method (init), on every training
    image of the source's classes. It has no validation split: with the default classes
    ("other") the task's held-out images are not among its classes; with "all" it sees every
    training image, the task's validation images included. A guide is evaluated once, after its
    last epoch."""
    return config.with_(method=spec.scratch_name, train_fraction=1.0, val_fraction=0.0,
                        classes=source_classes(config), seed=config.gta_source_seed,
                        epochs=config.gta_source_epochs, eval_every=config.gta_source_epochs,
                        **_reset(config, GUIDE_FIELDS))


def cnn_config(config: TrainConfig) -> TrainConfig:
    """The link guide: the small CNN on the same training subset and seed as the ViT, evaluated
    after its last epoch."""
    return config.with_(method="cnn", epochs=config.cnn_epochs, eval_every=config.cnn_epochs,
                        lr=config.cnn_lr, **_reset(config, GUIDE_FIELDS + VIT_FIELDS))


def basic_link_config(config: TrainConfig, spec: MethodSpec) -> TrainConfig:
    """The `link` run whose final links link_advanced starts from: the same configuration and
    seed with the basic links (link_advanced_k does not change it)."""
    return config.with_(method=spec.basic_link_name,
                        link_advanced_k=TrainConfig().link_advanced_k)


# A guide run's cache folder (in cache_dir) and configuration: "<kind>-<hash of the config>".

def source_run(config: TrainConfig, spec: MethodSpec) -> tuple[str, TrainConfig]:
    cfg = source_config(config, spec)
    return f"gta-source-{cfg.key()}", cfg


def cnn_run(config: TrainConfig) -> tuple[str, TrainConfig]:
    cfg = cnn_config(config)
    return f"cnn-{cfg.key()}", cfg


def basic_link_run(config: TrainConfig, spec: MethodSpec) -> tuple[str, TrainConfig]:
    cfg = basic_link_config(config, spec)
    return f"link-{cfg.key()}", cfg


def guide_runs(config: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The cached guide runs (cache folder name, configuration) that building `config` reads,
    each after the guides it reads itself (link_advanced: the CNN, then the link run that uses
    it). compare --workers trains them before the runs that read them."""
    spec = parse_method(config.method)
    runs = []
    if spec.regulariser in ("gta", "finetune") and config.gta_source == "auto":
        runs.append(source_run(config, spec))
    elif spec.regulariser in LINKS and config.link_cnn == "auto":
        runs.append(cnn_run(config))
    if spec.regulariser == "link_advanced":
        runs.append(basic_link_run(config, spec))
    return runs


def basic_links(config: TrainConfig, spec: MethodSpec, *, cache_dir, ctx, log, progress,
                train_guide: GuideTrainer) -> dict:
    """{"weight", "bias"} of the links a `link` run of this seed ends with (run and cached
    when absent)."""
    name, cfg = basic_link_run(config, spec)
    ckpt = cached_run(cfg, name, cache_dir=cache_dir, ctx=ctx, log=log,
                      progress=progress, train_guide=train_guide)
    task = ckpt["task"]
    return {"weight": task["link.links.weight"], "bias": task["link.links.bias"]}


def shared_link_run(config: TrainConfig):
    """(cache folder name, configuration) under which share_link_run stores a finished run of
    `config`: a `link` method's run; None for any other method."""
    spec = parse_method(config.method)
    return basic_link_run(config, spec) if spec.regulariser == "link" else None


def share_link_run(config: TrainConfig, folder: str, cache_dir: str) -> bool:
    """Copies a finished `link` run (folder) into cache_dir as the first run of link_advanced with
    the same configuration and seed, so that a comparison of both trains it once. The copy
    records basic_link_config's configuration (link_advanced_k at its default: k does not
    change a link run); the checkpoint goes first and metrics.json last, so the cache entry
    counts as complete only once both are there. Returns whether it copied."""
    shared = shared_link_run(config)
    if shared is None:
        return False
    name, basic = shared
    target = os.path.join(cache_dir, name)
    if _complete(target, basic):
        return False
    ckpt = load_checkpoint(os.path.join(folder, "checkpoint.pt"), f"{folder}: checkpoint")
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    os.makedirs(target, exist_ok=True)
    save_torch({**ckpt, "config": basic.to_dict()}, os.path.join(target, "checkpoint.pt"))
    save_json({**metrics, "config": basic.to_dict()}, os.path.join(target, "metrics.json"))
    return True


def check_guides(config: TrainConfig) -> None:
    """Validate guide arguments before anything is written (one-line errors)."""
    spec = parse_method(config.method)
    if spec.regulariser == "gta" and config.gta_source != "auto":
        ckpt = load_checkpoint(config.gta_source, "--gta-source")
        if "vit_config" not in ckpt:
            raise CheckpointError(f"--gta-source: {config.gta_source!r} holds no ViT (a CNN "
                                  "checkpoint?)")
    if spec.regulariser in LINKS and config.link_cnn != "auto":
        parse_torchvision_spec(config.link_cnn)


def parse_torchvision_spec(text: str) -> tuple[str, str]:
    kind, _, rest = text.partition(":")
    arch, _, path = rest.partition(":")
    if kind != "torchvision" or not arch or not path:
        raise MethodError(f"--link-cnn must be 'auto' or 'torchvision:ARCH:WEIGHTS_FILE'; got "
                          f"{text!r}")
    if arch not in TORCHVISION_LAYERS:
        raise MethodError(f"--link-cnn: architecture {arch!r} must be one of "
                          f"{sorted(TORCHVISION_LAYERS)}")
    if not os.path.isfile(path):
        raise MethodError(f"--link-cnn: no weights file at {path!r} (this tool never downloads)")
    return arch, path


def gta_source(config: TrainConfig, data, spec: MethodSpec, *, cache_dir, ctx, log,
               progress, train_guide: GuideTrainer) -> nn.Module:
    if config.gta_source != "auto":
        source = vit_from_checkpoint(load_checkpoint(config.gta_source, "--gta-source"))
        want = build_vit(config, data_info(data), MethodSpec())
        if param_shapes(source) != param_shapes(want):
            raise MethodError(f"--gta-source {config.gta_source}: its ViT does not have the "
                              f"shapes of model {config.resolved_model()!r} on this data")
        return source
    name, cfg = source_run(config, spec)
    ckpt = cached_run(cfg, name, cache_dir=cache_dir, ctx=ctx, log=log,
                      progress=progress, train_guide=train_guide)
    return vit_from_checkpoint(ckpt)


def link_cnn(config: TrainConfig, data, *, cache_dir, ctx, log, progress,
             train_guide: GuideTrainer):
    """(frozen CNN, layer names, input transform or None)."""
    layers = [s for s in config.link_cnn_layers.split(",") if s]
    if config.link_cnn == "auto":
        name, cfg = cnn_run(config)
        ckpt = cached_run(cfg, name, cache_dir=cache_dir, ctx=ctx, log=log,
                          progress=progress, train_guide=train_guide)
        cnn = SmallCNN(**ckpt["cnn_config"])
        cnn.load_state_dict(ckpt["model"])
        return cnn, layers or list(SMALL_CNN_LAYERS), None
    arch, path = parse_torchvision_spec(config.link_cnn)
    try:
        cnn = torchvision_cnn(arch, path)
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    return cnn, layers or list(TORCHVISION_LAYERS[arch]), TorchvisionInput()


def param_shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def cached_run(cfg: TrainConfig, name: str, *, cache_dir: str, ctx: DistContext, log, progress,
               train_guide: GuideTrainer) -> dict:
    """The final checkpoint of run `cfg` in cache_dir/name, training it first when absent.

    A cached checkpoint that cannot be loaded safely (e.g. one holding numpy arrays) is
    trained again, which gives the same guide (the runs are
    deterministic).

    Under DDP only rank 0 trains a missing guide (one process, no communication); the other
    ranks wait at a barrier without the short timeout (ctx.wait_for_main) and then read the
    cache.
    """
    folder = os.path.join(cache_dir, name)
    what = f"cached guide {folder}"
    path = os.path.join(folder, "checkpoint.pt")
    if ctx.is_main and not (_complete(folder, cfg) and _loads(path, what, log)):
        log(f"[cache] training {cfg.method} guide into {folder}")
        resume = _same_checkpoint(path, cfg, what)
        train_guide(cfg, folder, resume=resume, ctx=DistContext(device=ctx.device), log=log,
                  progress=progress, name=name, cache_dir=cache_dir)
    elif ctx.is_main:
        log(f"[cache] using {cfg.method} guide from {folder}")
    ctx.wait_for_main()
    return load_checkpoint(path, what)


def guide_is_cached(cache_dir: str, name: str, cfg: TrainConfig) -> bool:
    """Whether cache_dir/name holds a finished run of cfg (cached_run then only loads it)."""
    return _complete(os.path.join(cache_dir, name), cfg)


def _complete(folder: str, cfg: TrainConfig) -> bool:
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return m.get("status") == "complete" and m.get("config") == cfg.to_dict()


def _loads(path: str, what: str, log) -> bool:
    try:
        load_checkpoint(path, what)
        return True
    except CheckpointError as exc:
        log(f"[cache] {exc}; training it again")
        return False


def _same_checkpoint(path: str, cfg: TrainConfig, what: str) -> bool:
    """Whether path holds a loadable checkpoint of cfg to continue (else the guide starts
    again)."""
    if not os.path.isfile(path):
        return False
    try:
        return load_checkpoint(path, what)["config"] == cfg.to_dict()
    except CheckpointError:
        return False
