"""Atomic writes of checkpoints, JSON and CSV; reading checkpoints back safely, with one-line
errors; RNG states as tensors and plain containers.

A file is first written to a temporary name in the same folder (`.NAME.XXXXXXXX.tmp`), then moved
over the target with os.replace (atomic on POSIX): a run killed at any instant leaves either the
previous complete file or the new complete one, never half of one. Checkpoints are also fsynced,
and so is their folder after the rename, so that they survive a power loss too. A kill can leave
a temporary file behind; remove_stale_temps deletes those when a run starts or resumes.

Checkpoints hold only tensors, numbers, strings, None and lists / tuples / dicts of them, and are
read with torch.load(weights_only=True): a file that holds anything else (a pickled object whose
loading would run code) is refused with a CheckpointError, never unpickled.
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from . import testhooks


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; one-line message."""


def _fsync_dir(folder: str) -> None:
    """Persists a rename inside `folder` (the directory entry itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: str, write: Callable[[Any], None], mode: str, sync: bool = False) -> None:
    """sync=True fsyncs the file before the rename and the folder after it: the file then
    survives a power loss too, not only a killed process (used for checkpoints; logs are
    rewritten from them on --resume)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            if sync:
                f.flush()
                testhooks.pause_in_checkpoint_write()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_dir(folder)


def save_torch(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb", sync=True)


def save_json(obj: Any, path: str) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), "w")


def save_text(text: str, path: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def save_png(fig, path: str) -> None:
    """A matplotlib figure as a PNG, atomically."""
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")


# The files this tool writes atomically; a killed write leaves `.NAME.XXXXXXXX.tmp` beside them.
OUTPUT_FILES = ("checkpoint.pt", "metrics.json", "log.csv", "results.csv", "summary.csv",
                "accuracy.png", "attention.png")
_TEMP = re.compile(r"^\.(%s)\.[A-Za-z0-9_]+\.tmp$" % "|".join(re.escape(n) for n in OUTPUT_FILES))


def is_temp(name: str) -> bool:
    """Whether a file name is the temporary file of an atomic write of this tool."""
    return _TEMP.match(name) is not None


def stale_temps(folder: str) -> list[str]:
    """Temporary files of interrupted atomic writes in `folder` (names only)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if is_temp(n))


def remove_stale_temps(folder: str) -> list[str]:
    """Deletes what stale_temps finds (a previous process was killed while writing)."""
    gone = stale_temps(folder)
    for name in gone:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return gone


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():  # torch's weights-only refusal names the global it met
        if "Unsupported" in line or "GLOBAL" in line:
            return line.strip()
    return text.splitlines()[0].strip() if text.strip() else type(exc).__name__


def safe_torch_load(path: str, what: str) -> Any:
    """torch.load(weights_only=True) of `path`; CheckpointError (one line) when the file is
    missing, unreadable, or holds anything but tensors and plain containers."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint file at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt / truncated / not a torch file / unsafe
        named = _GLOBAL.search(str(exc))  # the weights-only unpickler met a global: refuse it
        if named:
            older = (" (a checkpoint of an older fastattnreg, which stored numpy RNG states as "
                     "arrays, cannot be resumed: train it again)"
                     if named.group(1).startswith("numpy") else "")
            raise CheckpointError(
                f"{what}: refused to load {path!r}: it names {named.group(1)}, not a tensor or "
                "plain container (a checkpoint of this tool holds only those; loading anything "
                f"else could run code){older}") from None
        raise CheckpointError(f"{what}: cannot read checkpoint {path!r} "
                              f"({_first_line(exc)})") from None


def load_checkpoint(path: str, what: str) -> dict:
    """A checkpoint written by this tool (safe_torch_load); CheckpointError (one line) otherwise."""
    ckpt = safe_torch_load(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{what}: {path!r} is not a fastattnreg checkpoint "
                              "(no 'model' / 'config' entries)")
    return ckpt


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Every global RNG a training step may draw from (python, numpy, torch CPU and CUDA), as
    tensors and plain values (weights_only-loadable); set_rng_state restores them exactly.

    python: random.getstate() = (version, 625 ints < 2**32, gauss_next) -> int64 tensor (625,).
    numpy: the legacy MT19937 state (name, 624 uint32 keys, pos, has_gauss, cached_gaussian)
    -> int64 tensor (624,) and plain numbers.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()),
                     py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
