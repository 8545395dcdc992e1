"""A stand-in rank for the launcher's signal tests: ``torchrun ... -m tests.cli.signal_worker OUT_DIR``.

Writes ``ready-<rank>`` (its pid and torchrun's), appends every stop signal it gets to ``signals-<rank>``, and on
the first one "saves" for a moment and exits 75, as the trainer does after saving on a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SAVED_EXIT_CODE = 75


def main() -> None:
    out, rank = Path(sys.argv[1]), os.environ["RANK"]
    received: list[str] = []

    def record(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        with open(out / f"signals-{rank}", "a") as f:
            f.write(received[-1] + "\n")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, record)
    (out / f"ready-{rank}").write_text(f"{os.getpid()} {os.getppid()}")
    while not received:
        time.sleep(0.02)
    time.sleep(1.0)  # saving; a second signal from torchrun would show up in the file meanwhile
    sys.exit(SAVED_EXIT_CODE)


if __name__ == "__main__":
    main()
