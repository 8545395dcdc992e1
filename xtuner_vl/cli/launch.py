"""Start ``torchrun`` for multi-process / multi-node runs, with the environment xtuner users know:
NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["needs_torchrun", "torchrun_command", "relaunch_with_torchrun"]


def needs_torchrun(env: dict[str, str] | None = None) -> bool:
    """True when several processes are asked for and we are not already inside torchrun / srun."""
    env = dict(os.environ if env is None else env)
    inside = "LOCAL_RANK" in env or "SLURM_PROCID" in env
    return not inside and (int(env.get("NPROC_PER_NODE", "1")) > 1 or int(env.get("NNODES", "1")) > 1)


def torchrun_command(argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env.get('NNODES', '1')}",
        f"--node_rank={env.get('NODE_RANK', '0')}",
        f"--nproc_per_node={env.get('NPROC_PER_NODE', '1')}",
        f"--master_addr={env.get('ADDR', '127.0.0.1')}",
        f"--master_port={env.get('PORT', '29500')}",
        "-m",
        "xtuner_vl.cli.main",
        *argv,
    ]


def relaunch_with_torchrun(argv: Sequence[str]) -> int:
    """Run ``xtuner-vl <argv>`` under torchrun and return its exit code."""
    cmd = torchrun_command(argv)
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)
