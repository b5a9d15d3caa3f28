"""Checks of a command line before anything is written: every number (range, finiteness), the
optional packages a command needs, and the model of each method, built and run once on a
batch of two random images (cheaper and surer than restating every model rule here).

Every failure is a UsageError whose message names the flag, the value and the limit; the
command line prints it as one line and exits with status 2.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from typing import Iterable, Optional

import torch

from ..models import SMALL_CNN_LAYERS, SmallCNN, ViTConfig, VisionTransformer
from .build import param_shapes, parse_torchvision_spec, source_classes
from .checkpoint import load_checkpoint, rng_state, set_rng_state
from .data import data_info_of, parse_classes
from .guide_cnns import TORCHVISION_LAYERS, TorchvisionInput, torchvision_cnn
from .methods import (LINKS, MethodError, MethodSpec, PlainTask, advance_links, build_vit,
                      gta_student, make_gta_task, make_link_task, parse_method)

SEED_MAX = 2**32 - 1  # seeds also seed numpy's legacy generator, which takes 32 bits


class UsageError(Exception):
    """A bad command line; its message is printed as one line."""


# ------------------------------------------------------------------------------ numbers

class Limit:
    """An interval [low, high] with open or closed ends, and how it reads in a message."""

    def __init__(self, low=None, high=None, *, low_open=False, high_open=False,
                 text: Optional[str] = None) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.text = text or self._describe()

    def _describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
                f"{')' if self.high_open else ']'}")

    def holds(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


POSITIVE = Limit(0, low_open=True)
NON_NEGATIVE = Limit(0)
COUNT = Limit(0, low_open=True)  # ints: "> 0", i.e. at least 1
FRACTION = Limit(0, 1, low_open=True)
SEED = Limit(0, SEED_MAX)

# argparse dest -> limit, for both commands (None values: flag not given, its default applies)
NUMBER_LIMITS = {
    "train_fraction": FRACTION,
    "val_fraction": Limit(0, 1, high_open=True),
    "epochs": COUNT,
    "eval_every": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "label_smoothing": Limit(0, 1, high_open=True),
    "img_size": COUNT,
    "gta_weight": NON_NEGATIVE,
    "gta_source_epochs": COUNT,
    "gta_source_seed": SEED,
    "link_weight": NON_NEGATIVE,
    "link_decay": FRACTION,
    "link_advanced_k": COUNT,
    "cnn_epochs": COUNT,
    "cnn_lr": POSITIVE,
    "threads": COUNT,
    "workers": COUNT,
    "time_epochs": NON_NEGATIVE,
    "ddp_timeout": POSITIVE,
    "seed": SEED,
}
STRUCTURED_KERNELS = (3, 5)
# compare --method-opt: the training settings one method's runs may set for themselves
METHOD_OPT_TYPES = {"lr": float, "batch_size": int, "weight_decay": float,
                    "warmup_epochs": int, "label_smoothing": float}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_number(name: str, value, limit: Limit) -> None:
    """UsageError naming `name`, `value` and the limit when value is not finite or outside."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number {limit.text}; got {value}")
    if not limit.holds(value):
        raise UsageError(f"{name} must be {limit.text}; got {value}")


def check_numbers(args) -> None:
    """Every numeric flag of `train` / `compare` (argparse namespace) against its limit."""
    for dest, limit in NUMBER_LIMITS.items():
        value = getattr(args, dest, None)
        if value is not None:
            check_number(flag(dest), value, limit)
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs must be in [0, --epochs) = [0, {args.epochs}); got "
                         f"{args.warmup_epochs}")
    if args.structured_kernel not in STRUCTURED_KERNELS:
        raise UsageError(f"--structured-kernel must be 3 or 5; got {args.structured_kernel}")


def parse_method_opts(items: Iterable[str], methods: list[str], epochs: int) -> dict:
    """compare --method-opt: ['baseline:batch-size=16'] -> {'baseline': {'batch_size': 16}}.
    `methods` are the canonical names of --methods (parse_method(...).name). UsageError naming
    the item for a malformed item, a method not compared, a setting that cannot be set per
    method, a value of the wrong type or outside its limit, or one setting given twice."""
    allowed = ", ".join(flag(d)[2:] for d in METHOD_OPT_TYPES)
    out: dict = {}
    for item in items:
        method, colon, setting = item.partition(":")
        name, equals, raw = setting.partition("=")
        if not (colon and equals and method and name):
            raise UsageError(f"--method-opt must be METHOD:SETTING=VALUE (e.g. "
                             f"baseline:batch-size=16); got {item!r}")
        try:
            method = parse_method(method).name
        except MethodError as exc:
            raise UsageError(f"--method-opt {item}: {exc}") from None
        if method not in methods:
            raise UsageError(f"--method-opt {item}: {method!r} is not compared (--methods "
                             f"{','.join(methods)})")
        dest = name.lstrip("-").replace("-", "_")
        if dest not in METHOD_OPT_TYPES:
            raise UsageError(f"--method-opt {item}: {name!r} cannot be set per method; these "
                             f"can: {allowed}")
        kind = METHOD_OPT_TYPES[dest]
        try:
            value = kind(raw)
        except ValueError:
            raise UsageError(f"--method-opt {item}: {raw!r} is not "
                             f"{'an integer' if kind is int else 'a number'}") from None
        check_number(f"--method-opt {method}:{flag(dest)[2:]}", value, NUMBER_LIMITS[dest])
        if dest == "warmup_epochs" and value >= epochs:
            raise UsageError(f"--method-opt {item}: warmup-epochs must be in [0, --epochs) = "
                             f"[0, {epochs}); got {value}")
        if dest in out.get(method, {}):
            raise UsageError(f"--method-opt sets {flag(dest)[2:]} of {method} twice")
        out.setdefault(method, {})[dest] = value
    return out


def check_seeds(seeds: Iterable[int], name: str = "--seeds") -> None:
    for s in seeds:
        check_number(name, s, SEED)


def check_overrides(overrides: dict) -> None:
    """--model-opt values: numbers must be finite (the model's own rules follow in dry_run)."""
    for key, value in overrides.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--model-opt {key}={value}: must be a finite number")


# ------------------------------------------------------------------------------ packages

# import name -> (pip package, what needs it)
PACKAGES = {
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "torchvision": "torchvision",
    "PIL": "pillow",
}


def needed_packages(command: str, data: str, train_fraction: float, configs) -> list:
    """[(import name, what needs it)] for one command line."""
    need = [("tqdm", "training (progress bars and log lines)")]
    kind = data.partition(":")[0]
    if kind in ("digits", "digits32"):
        need.append(("sklearn", "--data digits (scikit-learn's bundled digits)"))
    elif train_fraction < 1.0:
        need.append(("sklearn", "--train-fraction < 1 (a stratified split)"))
    if kind == "folder":
        need += [("torchvision", "--data folder:PATH (ImageFolder)"),
                 ("PIL", "--data folder:PATH (reading images)")]
    for config in configs:
        if parse_method(config.method).regulariser in LINKS and config.link_cnn != "auto":
            need.append(("torchvision", f"--link-cnn {config.link_cnn}"))
            break
    if command == "compare":
        need.append(("matplotlib", "compare (accuracy.png, attention.png)"))
    return need


def check_packages(need) -> None:
    """Imports each needed package; UsageError naming the one missing and how to install it."""
    for module, what in need:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            pip = PACKAGES[module]
            raise UsageError(f"{what} needs the package {pip!r}, which cannot be imported "
                             f"({exc}); install the training extra (pip install "
                             f"'fastattnreg[train]') or just {pip}") from None


# ------------------------------------------------------------------------------ models

@contextlib.contextmanager
def _rngs_kept():
    """Every global RNG as it was before (a dry run must not move any training number)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _reference_vit(vit_config: dict):
    """A ViT from a checkpoint's stored config, on the plain-PyTorch path (any device's run)."""
    return VisionTransformer(ViTConfig(**{**vit_config, "backend": "reference"}))


def dry_run(config, info: dict) -> None:
    """Builds the task of `config` (model, init, guide, regulariser) for data of shape `info`
    ({img_size, in_chans, num_classes}) on the CPU and runs it on 2 random images; UsageError
    with the model's own message when anything does not fit. Guide weights are not trained or
    loaded except a --gta-source checkpoint (checked for shape) and a torchvision weights file
    (checked to load)."""
    spec = parse_method(config.method)
    cfg = config.with_(backend="reference", device="cpu")
    size = info["img_size"]
    what = f"--method {spec.name}" + (f" with --model-opt {_opts(config.model_overrides)}"
                                       if config.model_overrides else "")
    try:
        with _rngs_kept():  # the models are built with grad on (the structured fit needs it)
            x = torch.randn(2, info["in_chans"], size, size)
            if spec.cnn:
                task = PlainTask(SmallCNN(info["in_chans"], info["num_classes"], size))
            elif spec.regulariser in ("gta", "finetune"):
                source = build_vit(cfg, info, MethodSpec(spec.init, spec.refiner))
                if config.gta_source != "auto":
                    given = _reference_vit(load_checkpoint(config.gta_source,
                                                           "--gta-source")["vit_config"])
                    if param_shapes(given) != param_shapes(build_vit(cfg, info, MethodSpec())):
                        raise UsageError(f"--gta-source {config.gta_source}: its ViT does not "
                                         f"have the shapes of model {config.resolved_model()!r}"
                                         " on this data")
                    source = given
                task = (make_gta_task(gta_student(source), source, cfg)
                        if spec.regulariser == "gta" else PlainTask(gta_student(source)))
            elif spec.regulariser in LINKS:
                vit = build_vit(cfg, info, spec)
                layers = [s for s in config.link_cnn_layers.split(",") if s]
                if config.link_cnn == "auto":
                    cnn, default, cnn_input = (SmallCNN(info["in_chans"], info["num_classes"],
                                                        size), SMALL_CNN_LAYERS, None)
                else:
                    arch, path = parse_torchvision_spec(config.link_cnn)
                    cnn, default, cnn_input = (torchvision_cnn(arch, path),
                                               TORCHVISION_LAYERS[arch], TorchvisionInput())
                task = make_link_task(vit, cnn, layers or list(default), cnn_input, cfg, info)
                if spec.regulariser == "link_advanced":
                    try:
                        task = advance_links(task, config.link_advanced_k)
                    except ValueError as exc:
                        raise UsageError(f"--link-advanced-k: {exc}") from None
            else:
                task = PlainTask(build_vit(cfg, info, spec))
            task.eval()
            with torch.no_grad():
                logits, _ = task(x)
    except UsageError:
        raise
    except (ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        raise UsageError(f"{what}: {msg}") from None
    if tuple(logits.shape) != (2, info["num_classes"]):
        raise UsageError(f"{what}: the model gives logits of shape {tuple(logits.shape)} for 2 "
                         f"images of {info['num_classes']} classes")


def _opts(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def check_models(configs, data: str, img_size: int) -> None:
    """dry_run of every distinct method among `configs` (one seed each)."""
    info = data_info_of(data, img_size)
    seen = set()
    for config in configs:
        if config.method not in seen:
            seen.add(config.method)
            task_classes = parse_classes(config.classes, info["num_classes"])
            if parse_method(config.method).regulariser in ("gta", "finetune") and \
                    config.gta_source == "auto":
                source_classes(config)  # a source with no classes left is refused here
            dry_run(config, {**info, "num_classes": len(task_classes)})


def ddp_timeout_default() -> float:
    """--ddp-timeout's default: FASTATTNREG_DDP_TIMEOUT or 300 s."""
    text = os.environ.get("FASTATTNREG_DDP_TIMEOUT", "300")
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"FASTATTNREG_DDP_TIMEOUT must be a number of seconds; got {text!r}") \
            from None
