"""Training and comparing ViTs on little data: `fastattnreg train` / `fastattnreg compare`.

data.py (digits / CIFAR-10 / ImageFolder in memory), methods.py (methods and combinations),
guide_cnns.py (torchvision CNN guides), build.py (model, task and cached guides), dist.py (the
DDP context), trainer.py (the loop, checkpoints), compare.py (methods x seeds, table),
plots.py, checkpoint.py (atomic files, safe loading), validate.py (command-line checks before
anything is written), testhooks.py (fault injection for the tests), cli.py.
"""
from .config import TrainConfig
from .trainer import train_run

__all__ = ["TrainConfig", "train_run"]
