"""Start ``torchrun`` for multi-process / multi-node runs, with the environment xtuner users know:
NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT.

The launcher stays in front of torchrun until it ends and hands on the stop signals a scheduler or a user
sends (:data:`FORWARDED_SIGNALS`), so stopping ``xtuner-vl`` stops every rank instead of orphaning them.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "FORWARDED_SIGNALS",
    "needs_torchrun",
    "relaunch_with_torchrun",
    "run_forwarding_signals",
    "torchrun_command",
    "torchrun_passes_sigusr1",
]

# torchrun's own default (--signals-to-handle, torch/distributed/run.py) plus SIGUSR1, which SLURM's
# `--signal` sends before the time limit. torchrun sends each of them to every worker's process group, waits
# --shutdown-timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s) and then SIGKILLs what is left.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def needs_torchrun(env: dict[str, str] | None = None) -> bool:
    """True when several processes are asked for and we are not already inside torchrun / srun."""
    env = dict(os.environ if env is None else env)
    inside = "LOCAL_RANK" in env or "SLURM_PROCID" in env
    return not inside and (int(env.get("NPROC_PER_NODE", "1")) > 1 or int(env.get("NNODES", "1")) > 1)


def torchrun_passes_sigusr1() -> bool:
    """Whether torchrun can be told to pass SIGUSR1 on: ``--signals-to-handle``, torch >= 2.9
    (pytorch/pytorch#160690). Older torchrun dies of SIGUSR1 and leaves the ranks running."""
    try:
        found = re.match(r"(\d+)\.(\d+)", version("torch"))
    except PackageNotFoundError:
        return False
    return found is not None and (int(found[1]), int(found[2])) >= (2, 9)


def torchrun_command(
    argv: Sequence[str], env: dict[str, str] | None = None, module: str = "xtuner_vl.cli.main"
) -> list[str]:
    """``python -m torch.distributed.run ... -m <module> <argv>`` for the node described by ``env``."""
    env = dict(os.environ if env is None else env)
    handle = []
    if torchrun_passes_sigusr1():
        # After a stop signal torchrun SIGKILLs the ranks once --shutdown-timeout (default 30 s) is over: too short
        # for the checkpoint the ranks then save (a 26B ZeRO-3 save takes minutes). The scheduler's own deadline
        # (SLURM KillWait, a Kubernetes grace period) still ends it.
        timeout = env.get("XTUNER_VL_SHUTDOWN_TIMEOUT", "900")
        handle = [f"--signals-to-handle={','.join(FORWARDED_SIGNALS)}", f"--shutdown-timeout={timeout}"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env.get('NNODES', '1')}",
        f"--node_rank={env.get('NODE_RANK', '0')}",
        f"--nproc_per_node={env.get('NPROC_PER_NODE', '1')}",
        f"--master_addr={env.get('ADDR', '127.0.0.1')}",
        f"--master_port={env.get('PORT', '29500')}",
        *handle,
        "-m",
        module,
        *argv,
    ]


def omp_threads_per_rank(env: Mapping[str, str] | None = None, cpus: int | None = None) -> str:
    """This node's cores shared among its ranks, for ``OMP_NUM_THREADS`` when the user has not set it.

    torchrun would set 1, with a banner on every launch; one thread per rank starves the CPU work a rank does
    (DeepSpeed's CPU Adam with the offload presets, collate in the main process).
    """
    env = os.environ if env is None else env
    nproc = max(1, int(env.get("NPROC_PER_NODE", "1")))
    return str(max(1, (cpus or os.cpu_count() or 1) // nproc))


def relaunch_with_torchrun(argv: Sequence[str], module: str = "xtuner_vl.cli.main") -> int:
    """Run ``python -m <module> <argv>`` (``xtuner-vl <argv>``) under torchrun and return its exit status.

    See :func:`run_forwarding_signals`. Where torchrun cannot pass SIGUSR1 on, the ranks get SIGTERM instead,
    which the trainer treats the same (save, stop).
    """
    from xtuner_vl.engine.preemption import PREEMPTED_EXIT_CODE, STOP_FILE_ENV

    cmd = torchrun_command(argv, module=module)
    print("launching: " + " ".join(cmd), flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", omp_threads_per_rank())
    stand_ins = {} if torchrun_passes_sigusr1() else {signal.SIGUSR1: signal.SIGTERM}
    # torchrun turns any worker status but 0 into 1; rank 0 writes this file once it saved on a stop signal.
    with tempfile.TemporaryDirectory(prefix="xtuner-vl-") as tmp:
        stop_file = Path(tmp) / "stopped"
        os.environ[STOP_FILE_ENV] = str(stop_file)
        status = run_forwarding_signals(cmd, stand_ins)
        if status != 0 and stop_file.is_file():
            print(f"xtuner-vl: the ranks saved and stopped ({stop_file.read_text().splitlines()[0]})", flush=True)
            return PREEMPTED_EXIT_CODE
    return status


def run_forwarding_signals(cmd: Sequence[str], stand_ins: Mapping[int, int] | None = None) -> int:
    """Run ``cmd`` (torchrun), hand it the first of :data:`FORWARDED_SIGNALS` received, return its exit status.

    The child runs in its own session, so a Ctrl-C in the terminal reaches it only through this process, and
    only once: torchrun (2.14) answers a second signal by signalling the ranks again and a third by exiting with
    the ranks still running, so later signals are reported, not passed on. On Linux the child also gets SIGTERM
    when this process dies without forwarding anything (SIGKILL, the OOM killer).

    Args:
        cmd: the command line.
        stand_ins: signals to send in place of others (``{SIGUSR1: SIGTERM}``).

    Returns:
        The child's exit status, or 128 + N when signal N killed it (the shell's convention).
    """
    stand_ins = dict(stand_ins or {})
    child: list[subprocess.Popen] = []
    received: list[int] = []

    def send(signum: int) -> None:
        sent = stand_ins.get(signum, signum)
        print(
            f"xtuner-vl: sending {signal.Signals(sent).name} to torchrun (pid {child[0].pid}) on "
            f"{signal.Signals(signum).name}",
            file=sys.stderr,
            flush=True,
        )
        child[0].send_signal(sent)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if len(received) > 1:
            print(
                f"xtuner-vl: {signal.Signals(signum).name} not passed on: torchrun is already stopping the ranks "
                f"on {signal.Signals(received[0]).name}",
                file=sys.stderr,
                flush=True,
            )
        elif child:
            send(signum)

    signums = [getattr(signal, name) for name in FORWARDED_SIGNALS if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, forward) for signum in signums}
    try:
        child.append(subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent()))
        if received:  # arrived while it was being started
            send(received[0])
        status = child[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies, or None off Linux.

    prctl(2) PR_SET_PDEATHSIG; the function pointer is looked up before the fork, so the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # died before the request took effect
            os._exit(1)

    return preexec
