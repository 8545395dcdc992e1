"""The launcher in front of torchrun: stop signals reach every rank once, nothing outlives it, its status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xtuner_vl.cli import launch
from xtuner_vl.cli.launch import FORWARDED_SIGNALS, torchrun_command

REPO = Path(__file__).resolve().parents[2]
# The launcher as `xtuner-vl train` runs it, with the stand-in rank as torchrun's module.
LAUNCHER = (
    "import sys; from xtuner_vl.cli.launch import relaunch_with_torchrun; "
    "sys.exit(relaunch_with_torchrun(sys.argv[1:], module='tests.cli.signal_worker'))"
)
# The launcher around any command (argv[1] is a JSON map of stand-in signals); a child that exits 75 on SIGTERM
# (as a trainer that saved) and is killed by SIGUSR1 (no handler).
RUN = (
    "import json, sys; from xtuner_vl.cli import launch; "
    "sys.exit(launch.run_forwarding_signals(sys.argv[2:], {int(k): v for k, v in json.loads(sys.argv[1]).items()}))"
)
CHILD = (
    "import os, signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
    "pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's pid 1 may never reap what gets reparented to it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(tmp_path: Path, command: list[str], **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_vars}
    with open(tmp_path / "launcher.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def leftovers():
    """Pids to SIGKILL after the test if they are still running, so a failing test orphans nothing either."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("torch_version", "passes"), [("2.14.1+cu130", True), ("2.10.0a0+git1", True), ("2.8.0", False)]
)
def test_torchrun_is_told_to_pass_sigusr1_on_where_it_can(monkeypatch, torch_version, passes):
    monkeypatch.setattr(launch, "version", lambda name: torch_version)
    assert launch.torchrun_passes_sigusr1() is passes
    cmd = torchrun_command(["cfg.py"], {})
    assert (f"--signals-to-handle={','.join(FORWARDED_SIGNALS)}" in cmd) is passes  # unknown to older torchrun
    assert cmd[-3:] == ["-m", "xtuner_vl.cli.main", "cfg.py"]
    assert torchrun_command(["x"], {}, module="pkg.worker")[-3:] == ["-m", "pkg.worker", "x"]


@pytest.mark.parametrize(
    ("sent", "stand_ins", "status"),
    [
        (signal.SIGTERM, {}, 75),
        (signal.SIGUSR1, {}, 128 + signal.SIGUSR1),
        (signal.SIGUSR1, {signal.SIGUSR1: signal.SIGTERM}, 75),  # the stand-in for a torchrun without SIGUSR1
    ],
)
def test_exit_status_is_the_childs(tmp_path, leftovers, sent, stand_ins, status):
    # Passed through as it is; a child killed by signal N gives 128 + N, as in a shell.
    up = tmp_path / "up"
    command = [sys.executable, "-c", RUN, json.dumps({int(k): int(v) for k, v in stand_ins.items()})]
    launcher = _start(tmp_path, [*command, sys.executable, "-c", CHILD, str(up)])
    leftovers.append(launcher.pid)
    _wait_for(lambda: up.exists() and up.read_text(), 30, "the child")
    leftovers.append(int(up.read_text()))
    launcher.send_signal(sent)
    assert launcher.wait(30) == status


def _launch_two_ranks(tmp_path: Path, leftovers: list[int]) -> tuple[subprocess.Popen, list[int]]:
    """The launcher over torchrun over two stand-in ranks, once both run: (launcher, [torchrun, rank 0, rank 1])."""
    out = tmp_path / "ranks"
    out.mkdir()
    launcher = _start(tmp_path, [sys.executable, "-c", LAUNCHER, str(out)], NPROC_PER_NODE="2", PORT=str(_free_port()))
    leftovers.append(launcher.pid)
    ready = [out / f"ready-{rank}" for rank in (0, 1)]
    try:
        _wait_for(
            lambda: all(p.exists() and p.read_text() for p in ready) or launcher.poll() is not None, 120, "both ranks"
        )
    finally:
        if launcher.poll() is not None:
            print((tmp_path / "launcher.log").read_text())
    pids = [tuple(map(int, p.read_text().split())) for p in ready]
    tree = [pids[0][1], pids[0][0], pids[1][0]]
    leftovers.extend(tree)
    assert pids[0][1] == pids[1][1]  # one torchrun
    return launcher, tree


def _signals_of_ranks(tmp_path: Path) -> list[list[str]]:
    return [(tmp_path / "ranks" / f"signals-{rank}").read_text().split() for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("sent", [(signal.SIGTERM,), (signal.SIGUSR1,), (signal.SIGINT, signal.SIGTERM)])
def test_stop_signals_reach_every_rank_once_and_nothing_survives(tmp_path, leftovers, sent):
    launcher, tree = _launch_two_ranks(tmp_path, leftovers)
    for signum in sent:
        launcher.send_signal(signum)
        time.sleep(0.2)
    status = launcher.wait(90)
    log = (tmp_path / "launcher.log").read_text()
    # Each rank got the first signal, and only it. torchrun answers a second one by sending SIGTERM to the ranks
    # again, and a third by exiting while they still run.
    assert _signals_of_ranks(tmp_path) == [[sent[0].name]] * 2, log
    # torchrun (torch 2.14) exits 1 when it was signalled, whatever the ranks' status: passed through as it is.
    assert status == 1, log
    _wait_for(lambda: not any(_alive(pid) for pid in tree), 10, "the process tree to end")


@pytest.mark.slow
def test_killed_launcher_takes_torchrun_and_ranks_along(tmp_path, leftovers):
    # SIGKILL cannot be forwarded: torchrun gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops the ranks.
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    launcher, tree = _launch_two_ranks(tmp_path, leftovers)
    launcher.kill()
    assert launcher.wait(30) == -signal.SIGKILL
    _wait_for(lambda: not any(_alive(pid) for pid in tree), 60, "torchrun and the ranks to end")
    assert _signals_of_ranks(tmp_path) == [["SIGTERM"]] * 2
