"""Command line: `fastattnreg train ...` and `fastattnreg compare ...` (also `python -m
fastattnreg`, and `torchrun --nproc_per_node N -m fastattnreg train ...` for DDP).

Every argument is checked before anything is written (validate.py): a bad command line
(unknown method, missing data path, a number out of range or not finite, a model that does not
fit the data, a missing optional package, an unreadable or unsafe checkpoint, ...) prints one
line `fastattnreg: error: ...` on stderr and exits with status 2, leaving no output folder
behind. A failure while training (a loss that is not finite, a DDP peer that died, anything
unexpected) also prints one line and exits with status 1; FASTATTNREG_DEBUG=1 adds the
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

import torch

from ..backend import BACKENDS
from ..init.structured import METHODS as STRUCTURED_METHODS
from ..models import preset_config
from ..ops.checks import MATCH_KINDS, MATCH_ROWS
from .build import check_guides
from .checkpoint import CheckpointError, load_checkpoint
from .compare import run_compare
from .config import TUNED_LR, TrainConfig, default_lr
from .data import AUGMENTS, DataError, parse_data_spec
from .dist import DistContext, init_distributed
from .methods import MethodError, parse_method, parse_overrides
from .trainer import TrainingError, log_to_stderr, resumable, train_run
from .workers import check_workers
from .validate import (UsageError, check_models, check_numbers, check_overrides, check_packages,
                       check_seeds, ddp_timeout_default, needed_packages, parse_method_opts)

EXIT_USAGE = 2
EXIT_FAILED = 1
DEFAULTS = TrainConfig()

__all__ = ["UsageError", "main", "make_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage too: keep one line
        raise UsageError(message)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that `train` and `compare` share."""
    d = DEFAULTS
    p.add_argument("--data", default=d.data,
                   help="digits (embedded, default) | digits32 | cifar10:PATH | folder:PATH")
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="stratified fraction of the training split, in (0, 1] (fixed seed 0)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold this stratified part of the training subset out and evaluate on "
                        "it instead of the test split (hyper-parameter tuning), in [0, 1); "
                        "default 0: evaluate on the test split")
    p.add_argument("--classes", default=d.classes,
                   help="the task's classes, e.g. 5-9 or 0,2,4 (labels renumbered from 0); "
                        "default all")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate after every this many epochs and after the last one (the "
                        "same training and final numbers; fewer points in log.csv and the "
                        "accuracy plot); default 1")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (default: the method's tuned rate, "
                        + ", ".join(f"{m} {lr:g}" for m, lr in TUNED_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--augment", default=d.augment, choices=AUGMENTS)
    p.add_argument("--img-size", type=int, default=d.img_size,
                   help="folder data: images are resized to this size")
    p.add_argument("--model", default=d.model, help="ViT preset (auto: by data)")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ViTConfig field, e.g. --model-opt depth=6 (repeatable)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"),
                   help="fp32, or bf16: forward passes under torch.autocast in bfloat16 (CPU "
                        "and GPU; the attention ops run in bfloat16)")
    p.add_argument("--structured-method", default=d.structured_method,
                   choices=STRUCTURED_METHODS)
    p.add_argument("--structured-kernel", type=int, default=d.structured_kernel)
    p.add_argument("--gta-source", default=d.gta_source,
                   help="auto (train on the full training split and cache) | CHECKPOINT")
    p.add_argument("--gta-weight", type=float, default=d.gta_weight)
    p.add_argument("--gta-kind", default=d.gta_kind, choices=MATCH_KINDS)
    p.add_argument("--gta-rows", default=d.gta_rows, choices=MATCH_ROWS)
    p.add_argument("--gta-source-epochs", type=int, default=d.gta_source_epochs)
    p.add_argument("--gta-source-seed", type=int, default=d.gta_source_seed)
    p.add_argument("--gta-source-classes", default=d.gta_source_classes,
                   help="the classes the auto source of gta / finetune trains on: other (those "
                        "not in --classes, default: it never sees the task's labels) | all | "
                        "a --classes list")
    p.add_argument("--link-cnn", default=d.link_cnn,
                   help="auto (small CNN trained on the same subset) | torchvision:ARCH:WEIGHTS")
    p.add_argument("--link-weight", type=float, default=d.link_weight)
    p.add_argument("--link-decay", type=float, default=d.link_decay)
    p.add_argument("--link-cnn-layers", default=d.link_cnn_layers,
                   help="comma-separated CNN submodules (default: the CNN's own choice)")
    p.add_argument("--link-advanced-k", type=int, default=d.link_advanced_k,
                   help="link_advanced: links kept per CNN channel, in [1, blocks x heads]")
    p.add_argument("--cnn-epochs", type=int, default=d.cnn_epochs)
    p.add_argument("--cnn-lr", type=float, default=d.cnn_lr)
    p.add_argument("--cache-dir", default=os.path.join("runs", "cache"),
                   help="where gta sources and link CNNs are cached, keyed by their config")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run(s) in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --out instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads; default torch's)")
    p.add_argument("--ddp-timeout", type=float, default=ddp_timeout_default(),
                   help="seconds a DDP rank waits for the others in a collective before it "
                        "fails (default: FASTATTNREG_DDP_TIMEOUT or 300)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastattnreg", description="Train and compare ViTs on little data "
                     "with attention regularisers computed by fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tr = sub.add_parser("train", help="train one method (one seed)")
    tr.add_argument("--method", default="baseline",
                    help="baseline | structured | mimetic | refiner | gta | finetune | link | "
                         "link_advanced | cnn, or a "
                         "combination such as structured+gta")
    tr.add_argument("--seed", type=int, default=0)
    _add_run_arguments(tr)
    cp = sub.add_parser("compare", help="train methods x seeds, print a table, plot")
    cp.add_argument("--methods", default="baseline,structured,mimetic,refiner,gta,link",
                    help="comma-separated methods (each may be a '+' combination)")
    cp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    cp.add_argument("--time-epochs", type=int, default=2,
                    help="after the runs, time this many training epochs of each method on the "
                         "fused backend and on --backend reference, in turn (summary columns "
                         "epoch_time_fused_s, epoch_time_reference_s); 0 skips it")
    cp.add_argument("--method-opt", action="append", default=[],
                    metavar="METHOD:SETTING=VALUE",
                    help="a training setting of one method's runs only, e.g. "
                         "baseline:batch-size=16 (repeatable; settings: lr, batch-size, "
                         "weight-decay, warmup-epochs, label-smoothing)")
    cp.add_argument("--workers", type=int, default=1,
                    help="train the runs in this many processes at once, each with --threads "
                         "threads (CPU only; the same numbers as 1); default 1")
    _add_run_arguments(cp)
    return parser


# ------------------------------------------------------------------------------ validation

def resolve_device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text not in ("cpu", "cuda") and not text.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda; got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available")
    return text


def config_from_args(args, method: str, seed: int) -> TrainConfig:
    return TrainConfig(
        method=method, data=args.data, train_fraction=args.train_fraction,
        val_fraction=args.val_fraction,
        classes=args.classes, seed=seed,
        epochs=args.epochs, eval_every=args.eval_every, batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else default_lr(parse_method(method)),
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, augment=args.augment, img_size=args.img_size,
        model=args.model, model_overrides=parse_overrides(args.model_opt),
        backend=args.backend, device=resolve_device(args.device), precision=args.precision,
        structured_method=args.structured_method, structured_kernel=args.structured_kernel,
        gta_source=args.gta_source, gta_weight=args.gta_weight, gta_kind=args.gta_kind,
        gta_rows=args.gta_rows, gta_source_epochs=args.gta_source_epochs,
        gta_source_seed=args.gta_source_seed, gta_source_classes=args.gta_source_classes,
        link_cnn=args.link_cnn,
        link_weight=args.link_weight, link_decay=args.link_decay,
        link_cnn_layers=args.link_cnn_layers, link_advanced_k=args.link_advanced_k,
        cnn_epochs=args.cnn_epochs, cnn_lr=args.cnn_lr)


def validate_data_and_model(args) -> None:
    """The data source and the model preset (numbers: check_numbers, before this)."""
    parse_data_spec(args.data)
    overrides = parse_overrides(args.model_opt)
    check_overrides(overrides)
    if args.model != "auto" or overrides:
        name = args.model if args.model != "auto" else TrainConfig(data=args.data).resolved_model()
        try:
            preset_config(name, **overrides)
        except ValueError as exc:
            raise UsageError(f"--model {name}: {exc}") from None


def validate_run(args, command: str, configs: list) -> None:
    """What is checked once the configurations exist: guides, optional packages, and a dry
    run of each method's model on a tiny batch."""
    for config in {c.method: c for c in configs}.values():
        check_guides(config)
    check_packages(needed_packages(command, args.data, args.train_fraction, configs))
    check_models(configs, args.data, args.img_size)


def check_out_dir(out: str, resume: bool, overwrite: bool, marker: str = "metrics.json") -> None:
    if resume:
        if not os.path.isdir(out):
            raise UsageError(f"--resume: output folder {out!r} does not exist")
        return
    if os.path.exists(os.path.join(out, marker)) and not overwrite:
        raise UsageError(f"output folder {out!r} already holds a run; pass --resume to continue "
                         "it, --overwrite to replace it, or another --out")


def default_name(args, method: Optional[str] = None, seed: Optional[int] = None) -> str:
    data = args.data.partition(":")[0]
    frac = f"f{args.train_fraction:g}"
    if method is None:
        return f"compare-{data}-{frac}"
    return f"{data}-{method}-{frac}-s{seed}"


# ------------------------------------------------------------------------------ commands

def cmd_train(args, ctx) -> int:
    spec = parse_method(args.method)
    validate_data_and_model(args)
    config = config_from_args(args, spec.name, args.seed)
    validate_run(args, "train", [config])
    out = args.out or os.path.join("runs", default_name(args, spec.name, args.seed))
    check_out_dir(out, args.resume, args.overwrite)
    resume = args.resume and resumable(out)
    if resume:
        load_checkpoint(os.path.join(out, "checkpoint.pt"), "--resume")
    elif args.resume:
        _logger(ctx)(f"--resume: {out!r} holds no checkpoint yet (stopped before its first "
                     "epoch ended); starting at epoch 1")
    metrics = train_run(config, out, resume=resume, ctx=ctx, log=_logger(ctx),
                        progress=not args.no_progress, cache_dir=args.cache_dir)
    if ctx.is_main:
        f = metrics["final"]
        print(f"{metrics['method']}: test accuracy {f['test_acc']:.4f}, test loss "
              f"{f['test_loss']:.4f}, {f['epoch_time_s']:.2f} s/epoch -> {out}")
    return 0


def cmd_compare(args, ctx) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods names no method")
    specs = [parse_method(m) for m in methods]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"--methods repeats a method: {args.methods!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers; got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must name distinct integers; got {args.seeds!r}")
    check_seeds(seeds)
    try:
        check_workers(args.workers, ctx)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    validate_data_and_model(args)
    own = parse_method_opts(args.method_opt, names, args.epochs)
    configs = {(n, s): config_from_args(args, n, s).with_(**own.get(n, {}))
               for n in names for s in seeds}
    validate_run(args, "compare", [configs[(n, seeds[0])] for n in names])
    out = args.out or os.path.join("runs", default_name(args))
    check_out_dir(out, args.resume, args.overwrite)
    run_compare(configs, names, seeds, out, resume=args.resume, ctx=ctx, log=_logger(ctx),
                progress=not args.no_progress, cache_dir=args.cache_dir,
                time_epochs=args.time_epochs, workers=args.workers)
    return 0


def _logger(ctx):
    return log_to_stderr if ctx.is_main else (lambda line: None)


def _error(message: str) -> None:
    msg = " ".join(str(message).split())  # one line, whatever the message held
    print(f"fastattnreg: error: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's exit status. A DDP rank that fails leaves at once with os._exit:
    tearing its process groups down could wait on a peer that no longer answers."""
    holder: list = []
    rc = _main(argv, holder)
    if rc != 0 and holder and holder[0].world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv, holder: list) -> int:
    ctx = None
    try:
        args = make_parser().parse_args(argv)
        check_numbers(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ctx = init_distributed(args.ddp_timeout)
        if ctx is None:
            ctx = DistContext(device=torch.device(resolve_device(args.device)))
        holder.append(ctx)
        if ctx.world > 1 and args.device not in ("auto", ctx.device.type):
            raise UsageError(f"--device {args.device} under torchrun: the device follows the "
                             f"process group ({ctx.device.type})")
        args.device = str(ctx.device.type)
        if args.precision == "bf16" and ctx.device.type == "cuda" and \
                not torch.cuda.is_bf16_supported():
            raise UsageError("--precision bf16: this GPU does not support bfloat16")
        rc = (cmd_train if args.command == "train" else cmd_compare)(args, ctx)
        if ctx.world > 1:  # only after success: a failed rank leaves without a last collective
            torch.distributed.destroy_process_group()
        return rc
    except (UsageError, DataError, MethodError, CheckpointError) as exc:
        _error(_ranked(exc, ctx))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastattnreg: interrupted (the last checkpoint is complete; continue with "
              "--resume)", file=sys.stderr)
        return 130
    except TrainingError as exc:
        _error(_ranked(exc, ctx))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - anything else: one line too, never a traceback
        if os.environ.get("FASTATTNREG_DEBUG") == "1":
            traceback.print_exc()
        hint = "" if os.environ.get("FASTATTNREG_DEBUG") == "1" else \
            " (FASTATTNREG_DEBUG=1 shows the traceback)"
        _error(_ranked(f"{type(exc).__name__}: {exc}{hint}", ctx))
        return EXIT_FAILED


def _ranked(message, ctx) -> str:
    """The message, prefixed with the rank under DDP (every rank prints its own)."""
    return f"[rank {ctx.rank}] {message}" if ctx is not None and ctx.world > 1 else str(message)


if __name__ == "__main__":
    sys.exit(main())
