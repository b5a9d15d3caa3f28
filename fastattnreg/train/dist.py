"""The distributed context of a run: rank, world size, device and the collectives the trainer
uses, and its construction from torchrun's environment (gloo on the CPU, nccl on CUDA).

Outside torchrun the context is rank 0 of a world of 1 and every collective is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

GUIDE_WAIT = datetime.timedelta(days=7)  # how long other ranks wait for rank 0's guide training


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


def init_distributed(timeout_s: float) -> Optional[DistContext]:
    """DistContext from torchrun's environment (WORLD_SIZE > 1), None outside torchrun.

    Every collective of the default group fails after timeout_s seconds, so when one rank dies
    the others stop within that time instead of waiting forever; the rendezvous has the same
    limit. Waiting for rank 0's guide training uses a separate gloo group with GUIDE_WAIT.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("FASTATTNREG_DDP_CPU") != "1"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s))
    wait_group = torch.distributed.new_group(backend="gloo", timeout=GUIDE_WAIT)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(rank=rank, world=world, device=device, wait_group=wait_group)
