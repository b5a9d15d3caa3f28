"""Image data for the trainer: the embedded digits, a local CIFAR-10, or an ImageFolder tree.

Every source is loaded once into memory as uint8 tensors (N, C, H, W) plus int64 labels, so a
training step indexes tensors directly: batches, augmentation and the data order are driven by
explicit torch.Generators that a checkpoint can save and restore (exact --resume), and DDP ranks
cut their shard out of the same global batch (same results as one process).

Sources (`--data`):
  digits        scikit-learn's bundled 8x8 digits (1797 images, 10 classes, values 0..16, no
                download). The *standard held-out test split* is a fixed stratified 25% split
                (train_test_split(test_size=0.25, stratify=y, random_state=0): 1347 train / 450
                test); it never changes with --seed or --train-fraction.
  digits32      the same digits (same split) upscaled to 16x16 and placed at random positions
                on a 32x32 canvas with light noise (digits32.py): 64 tokens of 4x4 patches.
  cifar10:PATH  torchvision's CIFAR-10 folder format read from disk (PATH or
                PATH/cifar-10-batches-py holding data_batch_1..5 and test_batch); never
                downloads. The test split is CIFAR-10's own test_batch.
  folder:PATH   an ImageFolder tree with PATH/train/<class>/* and PATH/test/<class>/*; images
                are resized to img_size x img_size (default 32) and converted to RGB.

The training subset (`--train-fraction f`, 0 < f <= 1) is a stratified sample of the training
split with a fixed seed (0), independent of --seed: every method and seed of a comparison sees
the same images. `--val-fraction v` (0 <= v < 1) holds a stratified v of that subset out as a
validation split (fixed seed VAL_SEED): the run trains on the rest and evaluates on the held-out
images instead of the test split, so that hyper-parameters are chosen without the test split.
Pixels are scaled to [0, 1] and normalised per channel with the mean and std of
the whole training split.
"""
from __future__ import annotations

import codecs
import os
import pickle
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import digits32

SUBSET_SEED = 0  # fixed: the training subset never depends on --seed
VAL_SEED = 1  # fixed: the validation images never depend on --seed
DIGITS_TEST_SIZE = 0.25
AUGMENTS = ("none", "flip", "crop", "crop-flip")


class DataError(ValueError):
    """A data source that cannot be used; the message is one line for the command line."""


@dataclass
class ImageData:
    """A training subset and the held-out test split, uint8 images in memory.

    x_*: (N, C, H, W) uint8; y_*: (N,) int64; pixel value = x * scale in [0, 1].
    mean, std: (C,) float32 statistics of the whole training split (after scaling).
    """
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    scale: float
    mean: torch.Tensor
    std: torch.Tensor
    classes: list = field(default_factory=list)
    full_train_size: int = 0
    eval_split: str = "test"  # what x_test holds: "test", or "validation" (--val-fraction)

    @property
    def in_chans(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def img_size(self) -> int:
        return int(self.x_train.shape[-1])

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> float32 normalised images."""
        x = x_uint8.float() * self.scale
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def describe(self) -> dict:
        return {"data": self.name, "train_images": int(self.y_train.numel()),
                "full_train_images": self.full_train_size, "test_images": int(self.y_test.numel()),
                "num_classes": self.num_classes, "in_chans": self.in_chans,
                "img_size": self.img_size, "eval_split": self.eval_split}


# ------------------------------------------------------------------------------ parsing

def parse_data_spec(spec: str) -> tuple[str, Optional[str]]:
    """'digits' | 'cifar10:PATH' | 'folder:PATH' -> (kind, path); DataError if malformed or
    if the path is missing (checked before any output is written)."""
    if spec in ("digits", "digits32"):
        return spec, None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("cifar10", "folder") or not path:
        raise DataError(f"--data must be 'digits', 'digits32', 'cifar10:PATH' or 'folder:PATH'; "
                        f"got {spec!r}")
    if not os.path.isdir(path):
        raise DataError(f"--data {spec}: folder {path!r} does not exist")
    if kind == "cifar10":
        _cifar_dir(path)
    else:
        for part in ("train", "test"):
            if not os.path.isdir(os.path.join(path, part)):
                raise DataError(f"--data {spec}: an ImageFolder needs {os.path.join(path, part)!r} "
                                "(PATH/train/<class>/... and PATH/test/<class>/...)")
    return kind, path


def data_info_of(spec: str, img_size: int = 32) -> dict:
    """{img_size, in_chans, num_classes} of a valid `spec` without loading its images (what a
    dry run of the model needs before any output is written)."""
    kind, path = parse_data_spec(spec)
    if kind == "digits":
        return {"img_size": 8, "in_chans": 1, "num_classes": 10}
    if kind == "digits32":
        return {"img_size": digits32.CANVAS, "in_chans": 1, "num_classes": 10}
    if kind == "cifar10":
        return {"img_size": 32, "in_chans": 3, "num_classes": 10}
    train = os.path.join(path, "train")
    classes = [e.name for e in os.scandir(train) if e.is_dir()]
    if not classes:
        raise DataError(f"--data folder:{path}: {train!r} holds no class folders")
    return {"img_size": img_size, "in_chans": 3, "num_classes": len(classes)}


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise DataError(f"--train-fraction must be in (0, 1]; got {fraction!r}")
    return float(fraction)


# ------------------------------------------------------------------------------ loading

def parse_classes(text: str, num_classes: int) -> list[int]:
    """'' -> every class; '5-9' or '0,2,4' (ranges and single labels) -> sorted class indices.
    DataError when a label is outside [0, num_classes) or the list is malformed or empty."""
    if not text:
        return list(range(num_classes))
    picked = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise DataError(f"--classes must list labels and ranges such as '5-9' or '0,2,4'; "
                            f"got {text!r}") from None
        if not 0 <= first <= last < num_classes:
            raise DataError(f"--classes {text!r}: labels must lie in [0, {num_classes - 1}] "
                            "with ranges low-high")
        picked.update(range(first, last + 1))
    return sorted(picked)


def other_classes(text: str, num_classes: int) -> str:
    """The classes not in `text` (a --classes value), in the same notation; DataError when none
    are left."""
    rest = sorted(set(range(num_classes)) - set(parse_classes(text, num_classes)))
    if not rest:
        raise DataError(f"--classes {text or 'all'!r} leaves no other classes for a source model")
    return ",".join(map(str, rest))


def _select(x: torch.Tensor, y: torch.Tensor, classes: list[int]):
    """The images of `classes`, labels renumbered 0..len(classes)-1 in that order."""
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def load_data(spec: str, train_fraction: float = 1.0, img_size: int = 32,
              classes: str = "", val_fraction: float = 0.0) -> ImageData:
    """The training subset and the test split of `spec` (see the module docstring), restricted
    to `classes` (a --classes value; '' keeps all) with their labels renumbered from 0. The
    normalisation statistics are those of the whole training split, whichever classes are kept,
    so a source model and its fine-tuned student see the same pixel scale. With val_fraction > 0
    the returned test images are the validation images held out of the training subset."""
    check_fraction(train_fraction)
    check_val_fraction(val_fraction)
    kind, path = parse_data_spec(spec)
    selected = classes
    if kind == "digits":
        x_tr, y_tr, x_te, y_te, scale, classes = _load_digits()
    elif kind == "digits32":
        x_tr, y_tr, x_te, y_te, _, classes = _load_digits()
        (x_tr, x_te), scale = digits32.make_digits32(x_tr, x_te), 1.0 / 255.0
    elif kind == "cifar10":
        x_tr, y_tr, x_te, y_te, scale, classes = _load_cifar10(path)
    else:
        x_tr, y_tr, x_te, y_te, scale, classes = _load_folder(path, img_size)
    flat = x_tr.float().mul_(scale).transpose(0, 1).reshape(x_tr.shape[1], -1)  # (C, N*H*W)
    mean, std = flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-6)
    if selected != "":
        keep = parse_classes(selected, len(classes))
        (x_tr, y_tr), (x_te, y_te) = _select(x_tr, y_tr, keep), _select(x_te, y_te, keep)
        classes = [classes[i] for i in keep]
    num_classes = len(classes)
    full = int(y_tr.numel())
    idx = training_subset(y_tr.numpy(), train_fraction, num_classes)
    if val_fraction > 0:
        fit, val = validation_split(y_tr[idx].numpy(), val_fraction, num_classes)
        return ImageData(spec, x_tr[idx][fit], y_tr[idx][fit], x_tr[idx][val], y_tr[idx][val],
                         num_classes, scale, mean, std, classes, full, eval_split="validation")
    return ImageData(spec, x_tr[idx], y_tr[idx], x_te, y_te, num_classes, scale, mean, std,
                     classes, full)


def check_val_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise DataError(f"--val-fraction must be in [0, 1); got {fraction!r}")
    return float(fraction)


def validation_split(labels: np.ndarray, fraction: float,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of a training subset with `labels`: a stratified
    `fraction` held out with the fixed seed VAL_SEED, both sorted. DataError when either part
    would hold fewer images than there are classes."""
    n = len(labels)
    held = int(round(fraction * n))
    if held < num_classes or n - held < num_classes:
        raise DataError(f"--val-fraction {fraction} holds out {held} of the {n} training images; "
                        f"both parts need at least the {num_classes} classes' worth")
    from sklearn.model_selection import train_test_split  # optional dependency (the training extra)
    fit, val = train_test_split(np.arange(n), test_size=held, stratify=labels,
                                random_state=VAL_SEED)
    return torch.from_numpy(np.sort(fit)), torch.from_numpy(np.sort(val))


def training_subset(labels: np.ndarray, fraction: float, num_classes: int) -> torch.Tensor:
    """Sorted indices of a stratified `fraction` of `labels`, fixed seed SUBSET_SEED."""
    n = len(labels)
    if fraction >= 1.0:
        return torch.arange(n)
    keep = int(round(fraction * n))
    if keep < num_classes:
        raise DataError(f"--train-fraction {fraction} keeps {keep} of {n} training images, "
                        f"fewer than the {num_classes} classes; use a larger fraction")
    from sklearn.model_selection import train_test_split  # optional dependency (the training extra)
    idx, _ = train_test_split(np.arange(n), train_size=keep, stratify=labels,
                              random_state=SUBSET_SEED)
    return torch.from_numpy(np.sort(idx))


def _load_digits():
    # sklearn is an optional dependency (the training extra), imported where the data needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y,
                              random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    y = torch.from_numpy(y)
    return x[tr], y[tr], x[te], y[te], 1.0 / 16.0, [str(c) for c in range(10)]


def _cifar_dir(path: str) -> str:
    for d in (path, os.path.join(path, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(d, f)) for f in _CIFAR_FILES):
            return d
    raise DataError(f"--data cifar10:{path}: no CIFAR-10 batches found (need "
                    f"{', '.join(_CIFAR_FILES)} in PATH or PATH/cifar-10-batches-py; this tool "
                    "never downloads)")


_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _numpy_globals() -> dict:
    """The callables a pickled numpy array or scalar names, found from numpy itself (their
    module moved from numpy.core to numpy._core in numpy 2; files name either)."""
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (pickle protocol 5)
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
           ("_codecs", "encode"): codecs.encode}  # bytes in python-3 protocol-2 pickles
    for core in ("numpy.core", "numpy._core"):
        out[(core + ".multiarray", "_reconstruct")] = reconstruct
        out[(core + ".multiarray", "scalar")] = scalar
        out[(core + ".numeric", "_frombuffer")] = frombuffer
    return out


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, str, numbers and numpy
    arrays (rebuilt through numpy's own reconstruct functions). Any other global a pickle
    names (a function whose call would run code) is refused before it is looked up."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists, bytes, strings and numbers") from None


def read_cifar_batch(file) -> dict:
    """One CIFAR-10 batch file (python 2 / 3 pickle) through _CifarUnpickler."""
    return _CifarUnpickler(file, encoding="bytes").load()


def _load_cifar10(path: str):
    d = _cifar_dir(path)

    def read(name):
        try:
            with open(os.path.join(d, name), "rb") as f:
                batch = read_cifar_batch(f)
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one line
            raise DataError(f"--data cifar10:{path}: cannot read {name}: {exc}") from None
        return data, labels

    parts = [read(n) for n in _CIFAR_FILES[:5]]
    x_tr = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y_tr = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    x_te, y_te = (torch.from_numpy(a) for a in read("test_batch"))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    return x_tr, y_tr, x_te, y_te, 1.0 / 255.0, classes


def _load_folder(path: str, img_size: int):
    # torchvision is an optional dependency (the training extra), needed only for image folders.
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.PILToTensor()])
    splits = []
    for part in ("train", "test"):
        try:
            ds = datasets.ImageFolder(os.path.join(path, part), transform=tf)  # RGB loader
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"--data folder:{path}: {part}: {exc}") from None
        splits.append(ds)
    if splits[0].classes != splits[1].classes:
        raise DataError(f"--data folder:{path}: train and test have different class folders "
                        f"({splits[0].classes} vs {splits[1].classes})")
    out = []
    for ds in splits:
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        out += [torch.stack(xs), torch.tensor(ys, dtype=torch.int64)]
    return (*out, 1.0 / 255.0, list(splits[0].classes))


# ------------------------------------------------------------------------------ batches

def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The global batches of one epoch: a permutation of range(n) drawn from `generator`, cut
    into batches of batch_size (the last one may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(batch_size))


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random flips / pad-and-crop of a uint8 batch (B, C, H, W), draws from `generator`.

    Called on the *global* batch before DDP ranks take their shard, so every world size draws
    the same numbers. crop: zero-pad by max(1, H // 8) and crop back at a random offset.
    Flips are wrong for digits (a mirrored 2 is not a 2), so digits default to 'none'.
    """
    if mode == "none":
        return x
    B, _, H, W = x.shape
    if "crop" in mode:
        pad = max(1, H // 8)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        offs = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)
        x = torch.stack([padded[i, :, r:r + H, c:c + W] for i, (r, c) in enumerate(offs.tolist())])
    if "flip" in mode:
        flip = torch.rand(B, generator=generator) < 0.5
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    return x
