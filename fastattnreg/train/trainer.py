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

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .build import build
from . import testhooks
from .checkpoint import (CheckpointError, is_temp, load_checkpoint, remove_stale_temps,
                         rng_state, save_json, save_text, save_torch, set_rng_state)
from .config import TrainConfig
from .data import augment, epoch_batches, load_data

DATA_SEED_OFFSET = 1_000_003  # the data-order generator is seeded with seed + this
AUG_SEED_OFFSET = 2_000_003
EVAL_BATCH = 256
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_reg", "train_acc", "test_loss", "test_acc",
              "epoch_time_s")


class TrainingError(RuntimeError):
    """A run that cannot go on (a loss that is not finite); one-line message."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A gloo group with a long timeout: the other ranks wait in it while rank 0 trains a guide
    # (minutes to hours), which the default group's short timeout would cut off.
    wait_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wait_for_main(self) -> None:
        """A barrier that waits as long as rank 0's guide training takes (wait_group)."""
        if self.world > 1:
            torch.distributed.barrier(group=self.wait_group)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _stderr(line: str) -> None:
    from tqdm import tqdm
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


@torch.no_grad()
def evaluate(model: nn.Module, data, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on the whole test split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data.y_test), EVAL_BATCH):
        x = data.normalise(data.x_test[i:i + EVAL_BATCH]).to(device)
        y = data.y_test[i:i + EVAL_BATCH].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    n = len(data.y_test)
    return loss_sum / n, correct / n


def reference_notes(built, config: TrainConfig, device) -> list[str]:
    """Which parts of the method run on the plain-PyTorch reference path for want of a fused op."""
    if built.kind != "vit":
        return []
    from ..backend import resolve
    if built.spec.refiner:
        from .methods import refiner_backend
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
    import numpy
    from .. import __version__
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "fastattnreg": __version__, "numpy": numpy.__version__}
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0:
            out["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def model_meta(built) -> dict:
    if built.kind == "vit":
        return {"vit_config": asdict(built.model.config)}
    return {"cnn_config": dict(built.model.config)}


# ------------------------------------------------------------------------------ the run

def train_run(config: TrainConfig, out_dir: str, *, resume: bool = False,
              ctx: Optional[DistContext] = None, log: Optional[Callable[[str], None]] = None,
              progress: bool = True, name: Optional[str] = None, cache_dir: str = "runs/cache",
              stop_after_epoch: Optional[int] = None) -> dict:
    """Trains `config` into `out_dir` and returns its metrics dict (also in metrics.json).

    resume: continue from out_dir/checkpoint.pt (must exist and hold the same config).
    stop_after_epoch: return after that many epochs, as a kill would (tests of --resume).
    """
    ctx = ctx or DistContext()
    log = log or _stderr
    name = name or os.path.basename(os.path.normpath(out_dir))
    device = ctx.device
    data = load_data(config.data, config.train_fraction, config.img_size)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(os.path.join(out_dir, "checkpoint.pt"), "--resume")
        if ckpt["config"] != config.to_dict():
            diff = sorted(k for k, v in config.to_dict().items() if ckpt["config"].get(k) != v)
            raise CheckpointError(f"--resume: the checkpoint in {out_dir!r} was trained with "
                                  f"other settings ({', '.join(diff)})")

    built = build(config, data, cache_dir=cache_dir, ctx=ctx, log=log, progress=progress)
    task = built.task.to(device)
    model = built.model
    n_train = len(data.y_train)
    spe = steps_per_epoch(n_train, config.batch_size, ctx.world)
    if spe < 1:
        raise ValueError(f"{n_train} training images cannot fill one batch on {ctx.world} ranks")
    opt = make_optimizer(task, config)
    sched = make_scheduler(opt, config, spe)
    data_gen = torch.Generator().manual_seed(config.seed + DATA_SEED_OFFSET)
    aug_gen = torch.Generator().manual_seed(config.seed + AUG_SEED_OFFSET)
    history: list[dict] = []
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_extra_state(task, model, ckpt["task"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        data_gen.set_state(ckpt["data_gen"])
        aug_gen.set_state(ckpt["aug_gen"])
        set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        start = int(ckpt["epoch"])
        log(f"[{name}] resuming after epoch {start}/{config.epochs}")
    ddp_task = task
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_task = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda"
                                           else None)

    notes = reference_notes(built, config, device)
    suffix = f" [{'; '.join(notes)}]" if notes else ""
    base = {"name": name, "method": built.spec.name, "config": config.to_dict(),
            "data": data.describe(), "world_size": ctx.world, "versions": versions(),
            "reference_path": notes}
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        gone = remove_stale_temps(out_dir)  # a killed write leaves one
        if gone:
            log(f"[{name}] removed {len(gone)} temporary file(s) of an interrupted write")
        if resume:  # the log and metrics as of the checkpoint (a kill may have come between)
            _write_logs(out_dir, base, history, config)
        else:  # a fresh run: no file of an earlier run in this folder stays behind
            for stale in ("checkpoint.pt", "metrics.json"):
                if os.path.exists(os.path.join(out_dir, stale)):
                    os.unlink(os.path.join(out_dir, stale))
            save_text(",".join(CSV_FIELDS) + "\n", os.path.join(out_dir, "log.csv"))

    from tqdm import tqdm
    bar = tqdm(range(start, config.epochs), desc=name, leave=False, file=sys.stderr,
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    for epoch in bar:
        if hasattr(task, "set_epoch"):
            task.set_epoch(epoch)
        task.train()
        t0 = time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0]  # ce sum, reg sum (per image), correct, images
        for step, idx in enumerate(global_batches(n_train, config, data_gen, ctx.world)):
            if epoch == start and step == 0:
                testhooks.maybe_fail(ctx.rank)
            xb = augment(data.x_train[idx], config.augment, aug_gen)
            mine = slice(ctx.rank, None, ctx.world)
            x = data.normalise(xb[mine]).to(device)
            y = data.y_train[idx][mine].to(device)
            logits, reg = ddp_task(x)
            ce = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            scale = len(y) * ctx.world / len(idx)
            opt.zero_grad(set_to_none=True)
            ((ce + reg) * scale).backward()
            opt.step()
            sched.step()
            ce_value, reg_value = ce.item(), float(reg.detach())
            if not math.isfinite(ce_value + reg_value):
                _stop(name, epoch, f"step {step + 1}: the training loss is not finite "
                      f"(cross-entropy {ce_value:g}, regulariser {reg_value:g})", history,
                      config)
            sums[0] += ce_value * len(y)
            sums[1] += reg_value * len(y)
            sums[2] += (logits.argmax(dim=1) == y).sum().item()
            sums[3] += len(y)
        epoch_time = time.perf_counter() - t0
        ce_sum, reg_sum, correct, seen = ctx.all_sum(sums)
        test_loss, test_acc = evaluate(model, data, device)
        if not math.isfinite(test_loss):
            _stop(name, epoch, f"the test loss is not finite ({test_loss:g})", history, config)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
               "train_loss": ce_sum / seen, "train_reg": reg_sum / seen,
               "train_acc": correct / seen, "test_loss": test_loss, "test_acc": test_acc,
               "epoch_time_s": epoch_time}
        history.append(row)
        log(f"[{name}] epoch {epoch + 1}/{config.epochs} loss {row['train_loss']:.4f} "
            f"reg {row['train_reg']:.4f} train_acc {row['train_acc']:.4f} "
            f"test_loss {test_loss:.4f} test_acc {test_acc:.4f} lr {row['lr']:.2e} "
            f"{epoch_time:.2f}s{suffix}")
        if ctx.is_main:
            _write_epoch(out_dir, row, base, history, config, epoch + 1, {
                "config": config.to_dict(), **model_meta(built), "model": model.state_dict(),
                "task": extra_state(task, model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_state(),
                "data_gen": data_gen.get_state(), "aug_gen": aug_gen.get_state(),
                "epoch": epoch + 1, "history": history})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            bar.close()
            return _metrics(base, history, config)
    bar.close()
    return _metrics(base, history, config)


def _metrics(base: dict, history: list[dict], config: TrainConfig) -> dict:
    done = len(history) >= config.epochs
    out = dict(base, status="complete" if done else "running", epochs=history)
    if history:
        last = history[-1]
        times = [h["epoch_time_s"] for h in history]
        out["final"] = {"test_acc": last["test_acc"], "test_loss": last["test_loss"],
                        "train_loss": last["train_loss"], "train_acc": last["train_acc"],
                        "best_test_acc": max(h["test_acc"] for h in history),
                        "epoch_time_s": sum(times) / len(times)}
    return out


def _stop(name: str, epoch: int, what: str, history: list, config: TrainConfig) -> None:
    last = f"after epoch {len(history)}" if history else "none was written"
    raise TrainingError(f"[{name}] epoch {epoch + 1}/{config.epochs}, {what}; the run stops "
                        f"and its last checkpoint ({last}) is left as it was (a lower --lr or "
                        "more --warmup-epochs may help)")


def _write_epoch(out_dir, row, base, history, config, epoch, ckpt) -> None:
    # Order matters for a kill at any point: the checkpoint first, then the CSV and metrics
    # derived from it (a resume rewrites both from the checkpoint's history).
    save_torch(ckpt, os.path.join(out_dir, "checkpoint.pt"))
    _write_logs(out_dir, base, history, config)


def _write_logs(out_dir, base, history, config) -> None:
    """log.csv and metrics.json from the history (one row per finished epoch)."""
    lines = [",".join(CSV_FIELDS)] + [",".join(f"{h[k]:.6g}" if isinstance(h[k], float)
                                              else str(h[k]) for k in CSV_FIELDS) for h in history]
    save_text("\n".join(lines) + "\n", os.path.join(out_dir, "log.csv"))
    save_json(_metrics(base, history, config), os.path.join(out_dir, "metrics.json"))
