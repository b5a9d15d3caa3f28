"""attention and refined_attention in processes forked after the parent used them.

The parent runs both ops (forward and backward, on two threads, so OpenMP has started a team and
the Refiner's scratch is kept, csrc/cpu/kept_cache.h), then:
  * a DataLoader with two fork workers computes them again: no deadlock, the workers start with
    no kept scratch (the parent's is dropped at the fork, csrc/cpu/fork_guard.h), and the results
    are bitwise the parent's;
  * a bare os.fork() child that keeps two intra-op threads (DataLoader workers run with one)
    runs attention on small tensors: GNU OpenMP's pool does not survive fork and a new team there
    would wait forever, so the kernels run their work on the calling thread. (torch's own ops on
    tensors large enough to go parallel hang in such a child; torch.set_num_threads(1) there, as
    DataLoader does, avoids it.)
Each scenario runs in a child interpreter with a timeout, so a deadlock fails the test instead of
hanging the suite.
"""
import subprocess
import sys
import textwrap

import pytest

from conftest import TESTS, requires_cpp

pytestmark = [requires_cpp, pytest.mark.slow]  # every test forks children that run the kernels

_COMMON = textwrap.dedent("""
    import os, sys
    import torch
    import fastattnreg
    from fastattnreg import attention, refined_attention
    sys.path.insert(0, {tests!r})
    from inputs import refiner_inputs

    torch.set_num_threads(2)

    def compute():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, 65, 16, generator=g).requires_grad_() for _ in range(3))
        out, maps = attention(q, k, v, export="full", backend="cpp")
        (out.square().sum() + maps.square().sum()).backward()
        qkv, params, running = refiner_inputs(2, 3, 65, 16, 2, 3, dtype=torch.float32)
        r = refined_attention(*qkv, *params[:3], params[3:7], params[7:11], *running,
                              training=True, backend="cpp")
        r.square().sum().backward()
        parts = [out, maps, q.grad, k.grad, v.grad, r, qkv[0].grad, params[1].grad,
                 running[1][3]]
        return torch.cat([t.detach().flatten() for t in parts])

    parent = compute()
    assert fastattnreg._C._kept_scratch_entries() > 0, "the Refiner keeps no scratch"
""")

_DATALOADER = textwrap.dedent("""
    from torch.utils.data import DataLoader, Dataset

    kept_at_start = []

    def init(worker_id):
        kept_at_start.append(fastattnreg._C._kept_scratch_entries())

    class Ops(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return kept_at_start[0], torch.get_num_threads(), compute()

    loader = DataLoader(Ops(), batch_size=None, num_workers=2, worker_init_fn=init,
                        multiprocessing_context="fork", timeout=60)
    results = list(loader)
    assert len(results) == 4
    for kept, threads, got in results:
        assert kept == 0, f"a worker started with {kept} kept scratch values"
        assert torch.equal(got, parent), (got - parent).abs().max()
    print("dataloader ok", threads)
""")

_BARE_FORK = textwrap.dedent("""
    g = torch.Generator().manual_seed(1)
    small = [torch.randn(2, 2, 17, 8, generator=g).requires_grad_() for _ in range(3)]
    want = attention(*small, export="cls", backend="cpp")
    want_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), small)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            kept = fastattnreg._C._kept_scratch_entries()
            assert torch.get_num_threads() == 2
            got = attention(*small, export="cls", backend="cpp")
            grads = torch.autograd.grad(got[0].sum() + got[1].sum(), small)
            same = all(torch.equal(a, b) for a, b in zip(list(got) + list(grads),
                                                           list(want) + list(want_grads)))
            code = 0 if kept == 0 and same else 1 if kept else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    assert os.WEXITSTATUS(status) == 0, {1: "child inherited kept scratch",
                                         2: "child's results differ",
                                         3: "child raised"}.get(os.WEXITSTATUS(status))
    print("bare fork ok")
""")


def _run(body: str, expect: str) -> None:
    script = _COMMON.format(tests=str(TESTS)) + body
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"deadlock: no result within {exc.timeout} s") from None
    assert res.returncode == 0 and expect in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_dataloader_fork_workers_after_use_in_the_parent():
    _run(_DATALOADER, "dataloader ok")


def test_bare_fork_child_with_two_threads_runs_the_kernels():
    _run(_BARE_FORK, "bare fork ok")
