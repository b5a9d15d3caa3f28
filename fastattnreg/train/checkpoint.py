"""Atomic writes of checkpoints, JSON and CSV, and reading checkpoints back with one-line errors.

A file is first written to a temporary name in the same folder (checkpoints also fsynced), then moved
over the target with os.replace (atomic on POSIX): a run killed at any instant leaves either the
previous complete file or the new complete one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; one-line message."""


def _atomic(path: str, write: Callable[[Any], None], mode: str, sync: bool = False) -> None:
    """sync=True also fsyncs before the rename: the file then survives a power loss too, not
    only a killed process (used for checkpoints; logs are rewritten from them on --resume)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb", sync=True)


def save_json(obj: Any, path: str) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), "w")


def save_text(text: str, path: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def save_png(fig, path: str) -> None:
    """A matplotlib figure as a PNG, atomically."""
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")


def load_checkpoint(path: str, what: str) -> dict:
    """torch.load a checkpoint written by this tool; CheckpointError (one line) otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - corrupt / truncated / not a torch file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{what}: cannot read checkpoint {path!r} ({msg})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{what}: {path!r} is not a fastattnreg checkpoint "
                              "(no 'model' / 'config' entries)")
    return ckpt


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Every global RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
