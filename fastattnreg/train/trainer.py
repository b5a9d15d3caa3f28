"""The training loop of one run: AdamW, warm-up + cosine schedule, a test evaluation, a log line,
a CSV row, metrics.json and an atomic checkpoint after every epoch; exact --resume; DDP.

Determinism: the model is built from torch.manual_seed(seed); the data order and augmentation
draw from two torch.Generators seeded from the seed; all of them (and python / numpy / torch
RNG states) are saved in each checkpoint, so a resumed run continues with the same numbers as
an uninterrupted one (on the CPU, bitwise), whenever the previous process was killed.

A loss that is not finite stops the run with a TrainingError before anything of that epoch is
written: the last checkpoint stays the last good one.

DDP (torchrun): every rank draws the same global batch of `batch_size` images, augments it with
the shared generator and keeps its shard (indices rank::world). Each rank's loss is its local
mean times n_local * world / n_global, so DDP's gradient average equals the gradient of the
global batch mean: the same update as one process, up to float summation order. A last batch
with fewer images than ranks is dropped (at world size 1 nothing is dropped). Batch statistics
of BatchNorm layers (Refiner) are per rank, as usual under DDP.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..backend import cpu_numerics, resolve
from . import testhooks
from .build import Built, build
from .checkpoint import (CheckpointError, is_temp, load_checkpoint, remove_stale_temps,
                         rng_state, save_json, save_text, save_torch, set_rng_state)
from .config import TrainConfig
from .data import augment, epoch_batches, load_data
from .dist import DistContext
from .methods import refiner_backend

DATA_SEED_OFFSET = 1_000_003  # the data-order generator is seeded with seed + this
AUG_SEED_OFFSET = 2_000_003
EVAL_BATCH = 256
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_reg", "train_acc", "test_loss", "test_acc",
              "epoch_time_s")


class TrainingError(RuntimeError):
    """A run that cannot go on (a loss that is not finite); one-line message."""


def log_to_stderr(line: str) -> None:
    """One log line on stderr, printed above the progress bar instead of through it."""
    from tqdm import tqdm  # optional dependency (the training extra), needed only to train
    tqdm.write(line, file=sys.stderr)


# ------------------------------------------------------------------------------ pieces

def make_optimizer(task: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norm weights, tokens and position embeddings (1-D or
    named *_token / pos_embed)."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.dim() <= 1 or name.endswith(("cls_token", "pos_embed"))
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(opt, config: TrainConfig, steps_per_epoch: int):
    """Per-step linear warm-up over warmup_epochs, then cosine decay to 0 at the last step."""
    total = max(1, config.epochs * steps_per_epoch)
    warm = min(config.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def global_batches(n: int, config: TrainConfig, gen: torch.Generator, world: int):
    batches = epoch_batches(n, config.batch_size, gen)
    if batches and len(batches[-1]) < world:
        batches = batches[:-1]
    return batches


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world else 0)


def autocast_for(precision: str, device) -> contextlib.AbstractContextManager:
    """The forward passes' precision: torch.autocast in bfloat16 for "bf16" (matmuls and the
    attention ops in bfloat16, with their float32 statistics; losses are taken in float32),
    nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data, device, precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on the whole test split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data.y_test), EVAL_BATCH):
        x = data.normalise(data.x_test[i:i + EVAL_BATCH]).to(device)
        y = data.y_test[i:i + EVAL_BATCH].to(device)
        with autocast_for(precision, device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    n = len(data.y_test)
    return loss_sum / n, correct / n


def reference_notes(built: Built, config: TrainConfig, device) -> list[str]:
    """Which parts of the method run on the plain-PyTorch reference path for want of a fused op."""
    if built.kind != "vit":
        return []
    if built.spec.refiner:
        note = refiner_backend(config.backend, str(device))[1]
        return [note] if note else []
    if resolve(config.backend, device) == "reference" and config.backend != "reference":
        return ["attention on the reference path (fused kernels not available here)"]
    return []


# The frozen guides of GTALoss / LinkTask: read again from their cache or file on --resume.
FROZEN_PREFIXES = ("source.", "link.cnn.")


def _model_prefix(task: nn.Module, model: nn.Module) -> str:
    return next(name for name, m in task.named_modules() if m is model) + "."


def resumable(out_dir: str) -> bool:
    """Whether --resume continues out_dir from its checkpoint (True) or starts it from epoch 0
    (False: a run killed before its first checkpoint left only a log header or temporary
    files). CheckpointError when out_dir holds other files but no checkpoint."""
    if os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
        return True
    # what a run leaves before its first checkpoint: the log header and temporary files
    others = sorted(n for n in os.listdir(out_dir) if n != "log.csv" and not is_temp(n))
    if others:
        raise CheckpointError(f"--resume: {out_dir!r} holds no checkpoint.pt (files: "
                              f"{', '.join(others[:4])}); is it a run folder of this tool?")
    return False


def extra_state(task: nn.Module, model: nn.Module) -> dict:
    """The task's state beyond the model (saved apart) and the frozen guides: e.g. the links."""
    skip = (_model_prefix(task, model),) + FROZEN_PREFIXES
    return {k: v for k, v in task.state_dict().items() if not k.startswith(skip)}


def load_extra_state(task: nn.Module, model: nn.Module, extra: dict) -> None:
    missing, unexpected = task.load_state_dict(extra, strict=False)
    skip = (_model_prefix(task, model),) + FROZEN_PREFIXES
    wrong = [k for k in missing if not k.startswith(skip)] + list(unexpected)
    if wrong:
        raise CheckpointError(f"--resume: the checkpoint's task state does not fit this method "
                              f"(keys {wrong[:4]})")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "fastattnreg": __version__, "numpy": numpy.__version__,
           "cpu_numerics": cpu_numerics()}
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def model_meta(built: Built) -> dict:
    if built.kind == "vit":
        return {"vit_config": asdict(built.model.config)}
    return {"cnn_config": dict(built.model.config)}


# ------------------------------------------------------------------------------ run state

@dataclass
class RunState:
    """What the epochs of one run read and update; its checkpoint holds all of it."""
    built: Built
    step_task: nn.Module  # built.task, or its DistributedDataParallel wrapper under DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_gen: torch.Generator  # the order of the training images
    aug_gen: torch.Generator  # the augmentation draws
    history: list[dict]  # one log.csv row per finished epoch
    epochs_done: int = 0

    @property
    def task(self) -> nn.Module:
        return self.built.task

    @property
    def model(self) -> nn.Module:
        return self.built.model


@dataclass
class EpochTotals:
    """Sums over one epoch's training steps: this rank's images, or every rank's (all_ranks)."""
    loss_sum: float = 0.0  # cross-entropy summed over images
    reg_sum: float = 0.0  # regulariser summed over images
    correct: float = 0.0  # images classified right
    images: float = 0.0

    def add(self, loss: float, reg: float, correct: int, images: int) -> None:
        self.loss_sum += loss * images
        self.reg_sum += reg * images
        self.correct += correct
        self.images += images

    def all_ranks(self, ctx: DistContext) -> "EpochTotals":
        return EpochTotals(*ctx.all_sum([self.loss_sum, self.reg_sum, self.correct,
                                         self.images]))


def new_state(built: Built, config: TrainConfig, n_train: int, ctx: DistContext) -> RunState:
    """Optimizer, schedule and generators of a run at epoch 0 (the task moved to ctx.device)."""
    built.task.to(ctx.device)
    steps = steps_per_epoch(n_train, config.batch_size, ctx.world)
    if steps < 1:
        raise ValueError(f"{n_train} training images cannot fill one batch on {ctx.world} ranks")
    optimizer = make_optimizer(built.task, config)
    return RunState(
        built=built, step_task=built.task, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config, steps),
        data_gen=torch.Generator().manual_seed(config.seed + DATA_SEED_OFFSET),
        aug_gen=torch.Generator().manual_seed(config.seed + AUG_SEED_OFFSET), history=[])


def read_resume_checkpoint(out_dir: str, config: TrainConfig) -> dict:
    """out_dir's checkpoint; CheckpointError when it was trained with other settings."""
    ckpt = load_checkpoint(os.path.join(out_dir, "checkpoint.pt"), "--resume")
    if ckpt["config"] != config.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if ckpt["config"].get(k) != v)
        raise CheckpointError(f"--resume: the checkpoint in {out_dir!r} was trained with "
                              f"other settings ({', '.join(diff)})")
    return ckpt


def restore(state: RunState, ckpt: dict) -> None:
    """Puts the run back where the checkpoint was written (the end of an epoch)."""
    state.model.load_state_dict(ckpt["model"])
    load_extra_state(state.task, state.model, ckpt["task"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.data_gen.set_state(ckpt["data_gen"])
    state.aug_gen.set_state(ckpt["aug_gen"])
    set_rng_state(ckpt["rng"])
    state.history = list(ckpt["history"])
    state.epochs_done = int(ckpt["epoch"])


def wrap_for_ddp(state: RunState, ctx: DistContext) -> None:
    """Under DDP the steps run through DistributedDataParallel, which broadcasts rank 0's
    parameters when it is built: after restore(), so every rank starts from the checkpoint."""
    if ctx.world > 1:
        device = ctx.device
        state.step_task = DistributedDataParallel(
            state.task, device_ids=[device.index] if device.type == "cuda" else None)


def checkpoint_of(state: RunState, config: TrainConfig) -> dict:
    """Everything restore() reads, after state.epochs_done epochs."""
    return {"config": config.to_dict(), **model_meta(state.built),
            "model": state.model.state_dict(), "task": extra_state(state.task, state.model),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "rng": rng_state(), "data_gen": state.data_gen.get_state(),
            "aug_gen": state.aug_gen.get_state(), "epoch": state.epochs_done,
            "history": state.history}


# ------------------------------------------------------------------------------ one epoch

def train_epoch(state: RunState, data, config: TrainConfig, ctx: DistContext, epoch: int,
                name: str, *, first_of_process: bool) -> dict:
    """Trains epoch `epoch` (0-based), evaluates on the test split when config.eval_every says so
    (test_loss and test_acc None otherwise) and returns its log.csv row. TrainingError, before
    anything is written, when a loss is not finite."""
    task = state.task
    if hasattr(task, "set_epoch"):
        task.set_epoch(epoch)
    task.train()
    t0 = time.perf_counter()
    n_train = len(data.y_train)
    totals = EpochTotals()
    for step, idx in enumerate(global_batches(n_train, config, state.data_gen, ctx.world)):
        if first_of_process and step == 0:
            testhooks.maybe_fail(ctx.rank)
        xb = augment(data.x_train[idx], config.augment, state.aug_gen)
        mine = slice(ctx.rank, None, ctx.world)
        x = data.normalise(xb[mine]).to(ctx.device)
        y = data.y_train[idx][mine].to(ctx.device)
        with autocast_for(config.precision, ctx.device):
            logits, reg = state.step_task(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        scale = len(y) * ctx.world / len(idx)
        state.optimizer.zero_grad(set_to_none=True)
        ((ce + reg) * scale).backward()
        state.optimizer.step()
        state.scheduler.step()
        ce_value, reg_value = ce.item(), float(reg.detach())
        if not math.isfinite(ce_value + reg_value):
            _stop(name, epoch, f"step {step + 1}: the training loss is not finite "
                  f"(cross-entropy {ce_value:g}, regulariser {reg_value:g})", state.history,
                  config)
        totals.add(ce_value, reg_value, (logits.argmax(dim=1) == y).sum().item(), len(y))
    epoch_time = time.perf_counter() - t0
    totals = totals.all_ranks(ctx)
    test_loss = test_acc = None
    if evaluates(epoch, config):
        test_loss, test_acc = evaluate(state.model, data, ctx.device, config.precision)
        if not math.isfinite(test_loss):
            _stop(name, epoch, f"the test loss is not finite ({test_loss:g})", state.history,
                  config)
    return {"epoch": epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],
            "train_loss": totals.loss_sum / totals.images,
            "train_reg": totals.reg_sum / totals.images,
            "train_acc": totals.correct / totals.images, "test_loss": test_loss,
            "test_acc": test_acc, "epoch_time_s": epoch_time}


def evaluates(epoch: int, config: TrainConfig) -> bool:
    """Whether epoch `epoch` (0-based) ends with an evaluation: every config.eval_every-th epoch
    and the last one."""
    return (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs


def _stop(name: str, epoch: int, what: str, history: list, config: TrainConfig) -> None:
    last = f"after epoch {len(history)}" if history else "none was written"
    raise TrainingError(f"[{name}] epoch {epoch + 1}/{config.epochs}, {what}; the run stops "
                        f"and its last checkpoint ({last}) is left as it was (a lower --lr or "
                        "more --warmup-epochs may help)")


# ------------------------------------------------------------------------------ files

def prepare_out_dir(out_dir: str, header: dict, state: RunState, config: TrainConfig, *,
                    resume: bool, name: str, log: Callable[[str], None]) -> None:
    """Rank 0, before the first epoch: out_dir exists, holds no temporary file of a killed
    write, and its log.csv / metrics.json match the checkpoint (resume) or are fresh."""
    os.makedirs(out_dir, exist_ok=True)
    gone = remove_stale_temps(out_dir)  # a killed write leaves one
    if gone:
        log(f"[{name}] removed {len(gone)} temporary file(s) of an interrupted write")
    if resume:  # the log and metrics as of the checkpoint (a kill may have come between)
        _write_logs(out_dir, header, state.history, config)
    else:  # a fresh run: no file of an earlier run in this folder stays behind
        for stale in ("checkpoint.pt", "metrics.json"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.unlink(os.path.join(out_dir, stale))
        save_text(",".join(CSV_FIELDS) + "\n", os.path.join(out_dir, "log.csv"))


def save_epoch(out_dir: str, header: dict, state: RunState, config: TrainConfig) -> None:
    """Rank 0, after each epoch. Order matters for a kill at any point: the checkpoint first,
    then the CSV and metrics derived from it (a resume rewrites both from its history)."""
    save_torch(checkpoint_of(state, config), os.path.join(out_dir, "checkpoint.pt"))
    _write_logs(out_dir, header, state.history, config)


def _metrics(header: dict, history: list[dict], config: TrainConfig) -> dict:
    done = len(history) >= config.epochs
    out = dict(header, status="complete" if done else "running", epochs=history)
    if history:
        last = history[-1]
        times = [h["epoch_time_s"] for h in history]
        tested = [h["test_acc"] for h in history if h["test_acc"] is not None]
        out["final"] = {"test_acc": last["test_acc"], "test_loss": last["test_loss"],
                        "train_loss": last["train_loss"], "train_acc": last["train_acc"],
                        "best_test_acc": max(tested) if tested else None,
                        "epoch_time_s": sum(times) / len(times)}
    return out


def _write_logs(out_dir, header, history, config) -> None:
    """log.csv and metrics.json from the history (one row per finished epoch)."""
    def cell(value) -> str:  # an epoch without evaluation leaves its test columns empty
        return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
    lines = [",".join(CSV_FIELDS)] + [",".join(cell(h[k]) for k in CSV_FIELDS) for h in history]
    save_text("\n".join(lines) + "\n", os.path.join(out_dir, "log.csv"))
    save_json(_metrics(header, history, config), os.path.join(out_dir, "metrics.json"))


# ------------------------------------------------------------------------------ the run

def train_run(config: TrainConfig, out_dir: str, *, resume: bool = False,
              ctx: Optional[DistContext] = None, log: Optional[Callable[[str], None]] = None,
              progress: bool = True, name: Optional[str] = None, cache_dir: str = "runs/cache",
              stop_after_epoch: Optional[int] = None) -> dict:
    """Trains `config` into `out_dir` and returns its metrics dict (also in metrics.json).

    resume: continue from out_dir/checkpoint.pt (must exist and hold the same config).
    stop_after_epoch: return after that many epochs, as a kill would (tests of --resume).
    """
    from tqdm import tqdm  # optional dependency (the training extra): the progress bar
    ctx = ctx or DistContext()
    log = log or log_to_stderr
    name = name or os.path.basename(os.path.normpath(out_dir))
    data = load_data(config.data, config.train_fraction, config.img_size, config.classes,
                     config.val_fraction)
    ckpt = read_resume_checkpoint(out_dir, config) if resume else None
    # Guides that build() must train are trained by this same function, into the cache.
    built = build(config, data, cache_dir=cache_dir, ctx=ctx, log=log, progress=progress,
                  train_guide=train_run)
    state = new_state(built, config, len(data.y_train), ctx)
    if ckpt is not None:
        restore(state, ckpt)
        log(f"[{name}] resuming after epoch {state.epochs_done}/{config.epochs}")
    wrap_for_ddp(state, ctx)

    notes = reference_notes(built, config, ctx.device)
    suffix = f" [{'; '.join(notes)}]" if notes else ""
    # the fields every metrics.json of this run starts with
    header = {"name": name, "method": built.spec.name, "config": config.to_dict(),
              "data": data.describe(), "world_size": ctx.world, "versions": versions(),
              "reference_path": notes}
    if ctx.is_main:
        prepare_out_dir(out_dir, header, state, config, resume=resume, name=name, log=log)

    start = state.epochs_done
    bar = tqdm(range(start, config.epochs), desc=name, leave=False, file=sys.stderr,
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    for epoch in bar:
        row = train_epoch(state, data, config, ctx, epoch, name, first_of_process=epoch == start)
        state.history.append(row)
        state.epochs_done = epoch + 1
        tested = "" if row["test_acc"] is None else \
            f"test_loss {row['test_loss']:.4f} test_acc {row['test_acc']:.4f} "
        log(f"[{name}] epoch {epoch + 1}/{config.epochs} loss {row['train_loss']:.4f} "
            f"reg {row['train_reg']:.4f} train_acc {row['train_acc']:.4f} {tested}"
            f"lr {row['lr']:.2e} {row['epoch_time_s']:.2f}s{suffix}")
        if ctx.is_main:
            save_epoch(out_dir, header, state, config)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    bar.close()
    return _metrics(header, state.history, config)
