"""`python -m fastattnreg train|compare ...` (and `torchrun ... -m fastattnreg train ...`)."""
import sys

from .train.cli import main

if __name__ == "__main__":
    sys.exit(main())
