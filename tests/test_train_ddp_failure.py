"""DDP fails fast: when one of 2 CPU ranks (gloo) fails, the other exits non-zero within the
process-group timeout (--ddp-timeout) instead of waiting in a collective for ever."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("sklearn")
from conftest import ROOT, requires_cpp  # noqa: E402
from train_helpers import TINY_ARGS  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts DDP process groups

TIMEOUT_S = 4
SLACK_S = 15  # process exit, a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, fault):
    """Two ranks of `fastattnreg train` as torchrun would start them, without its agent (which
    would kill the survivors itself): {rank: Popen}."""
    port = free_port()
    procs = {}
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), FASTATTNREG_DDP_CPU="1",
                   FASTATTNREG_TEST_FAIL_RANK=fault)
        procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "fastattnreg", "train", "--epochs", "2", *TINY_ARGS,
             "--ddp-timeout", str(TIMEOUT_S), "--out", str(tmp_path / "out"),
             "--cache-dir", str(tmp_path / "cache")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return procs


def wait_all(procs, ranks, limit=120.0):
    """{rank: seconds since now when it exited} for `ranks`."""
    t0, ended = time.monotonic(), {}
    while len(ended) < len(ranks):
        for r in ranks:
            if r not in ended and procs[r].poll() is not None:
                ended[r] = time.monotonic() - t0
        assert time.monotonic() - t0 < limit, f"ranks {set(ranks) - set(ended)} still run"
        time.sleep(0.05)
    return ended


def last(text):
    return text.strip().splitlines()[-1]


@requires_cpp
def test_when_one_rank_raises_every_rank_exits_nonzero(tmp_path):
    procs = launch(tmp_path, "1")
    ended = wait_all(procs, (0, 1))
    err = {r: procs[r].stderr.read() for r in (0, 1)}
    assert (procs[0].returncode, procs[1].returncode) == (1, 1), err
    assert last(err[1]).startswith("fastattnreg: error: [rank 1] InjectedFault"), err
    assert last(err[0]).startswith("fastattnreg: error: [rank 0] "), err
    assert ended[0] - ended[1] < TIMEOUT_S + SLACK_S


@requires_cpp
def test_a_rank_that_stops_answering_times_out_the_others(tmp_path):
    """Rank 1 hangs before its first step (its sockets stay open): rank 0 waits in the first
    gradient all-reduce for --ddp-timeout seconds, not gloo's default 30 minutes, and exits."""
    procs = launch(tmp_path, "1:hang")
    try:
        ended = wait_all(procs, (0,))
        line = last(procs[0].stderr.read())
        assert procs[0].returncode == 1
        assert line.startswith("fastattnreg: error: [rank 0] ") and "imed out" in line, line
        assert f"{TIMEOUT_S * 1000}ms" in line, line  # gloo names the timeout it waited
        assert procs[1].poll() is None  # still hanging: the timeout, not rank 1, ended rank 0
        assert ended[0] < 60 + TIMEOUT_S
    finally:
        if procs[1].poll() is None:
            procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)


@requires_cpp
def test_ranks_wait_for_a_guide_that_trains_longer_than_the_timeout(tmp_path):
    """Rank 0 trains the link CNN (several seconds) while rank 1 waits for it in the long-timeout
    group: a 2 s --ddp-timeout must not cut that wait off."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), FASTATTNREG_DDP_CPU="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "fastattnreg", "train", "--method", "link",
                        "--epochs", "1", "--cnn-epochs", "20", *TINY_ARGS,
                        "--train-fraction", "1", "--ddp-timeout", "2",
                        "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    guide = [line for line in p.stderr.splitlines() if line.startswith("[cnn-")]
    assert len(guide) == 20 and time.monotonic() - t0 > 2
    times = [float(line.rsplit(" ", 1)[1].rstrip("s")) for line in guide]
    assert sum(times) > 2, times  # the guide's training steps alone outlasted the timeout
