"""The collection order that lets pytest-xdist's worksteal scheduler start every long test at once.

worksteal (scripts/run_tests.sh: `-n 2 --dist worksteal`) hands the W workers contiguous shares
of the collected tests, the first len // W, the next len(rest) // (W - 1), and so on; a worker
that runs out steals from the end of another's queue, never its first two tests. So a long test
must sit at the start of a share: one queued later is either stolen late or runs after another
long test on the same worker, and the run ends on it. `order` deals the tests marked
`long(minutes=...)` out to the shares, longest first, each to the share with the fewest minutes
so far, and puts each share's long tests at its start; the short tests keep their order.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def share_sizes(n: int, workers: int) -> list[int]:
    """How many of n tests worksteal first sends to each of `workers` workers."""
    sizes = []
    for k in range(workers):
        size = (n - sum(sizes)) // (workers - k)
        sizes.append(size)
    return sizes


def order(items: Sequence[T], minutes: Callable[[T], float], workers: int) -> list[T]:
    """items reordered as the module docstring says (unchanged order of the short ones)."""
    longs = sorted((it for it in items if minutes(it) > 0), key=lambda it: -minutes(it))
    shorts = [it for it in items if minutes(it) == 0]
    workers = max(1, min(workers, len(items)))
    groups: list[list[T]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for it in longs:
        w = load.index(min(load))
        groups[w].append(it)
        load[w] += minutes(it)
    out: list[T] = []
    rest = iter(shorts)
    for group, size in zip(groups, share_sizes(len(items), workers)):
        out += group
        out += islice(rest, max(0, size - len(group)))
    out += list(rest)  # a share smaller than its long tests leaves short tests over
    return out
