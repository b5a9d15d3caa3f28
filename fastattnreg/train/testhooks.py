"""Fault injection for the tests of the trainer, off unless an environment variable asks.

FASTATTNREG_TEST_CHECKPOINT_PAUSE=SECONDS  sleep inside every checkpoint write, after the data is
    in the temporary file and before it replaces checkpoint.pt (a test kills the process there).
FASTATTNREG_TEST_FAIL_RANK=RANK  the DDP rank RANK raises before its first training step (a test
    checks that every other rank then exits within the process-group timeout);
    RANK:hang makes it sleep there for an hour instead (a rank that stops answering).
"""
from __future__ import annotations

import os
import time

CHECKPOINT_PAUSE = "FASTATTNREG_TEST_CHECKPOINT_PAUSE"
FAIL_RANK = "FASTATTNREG_TEST_FAIL_RANK"


class InjectedFault(RuntimeError):
    """The failure FASTATTNREG_TEST_FAIL_RANK asks for."""


def pause_in_checkpoint_write() -> None:
    seconds = os.environ.get(CHECKPOINT_PAUSE)
    if seconds:
        time.sleep(float(seconds))


def maybe_fail(rank: int) -> None:
    which, _, how = os.environ.get(FAIL_RANK, "").partition(":")
    if which != str(rank):
        return
    if how == "hang":
        time.sleep(3600)
    raise InjectedFault(f"rank {rank}: failure injected by {FAIL_RANK}")
