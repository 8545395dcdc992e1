"""Stop signals: finish the optimizer step, save, exit with a status of its own.

SLURM sends SIGTERM before it preempts or times out a job (and, with ``--signal=USR1@<seconds>``,
SIGUSR1 that long before); Kubernetes sends SIGTERM and waits its grace period; Ctrl-C is SIGINT.
The handler only records the signal; the trainer shares it across ranks at the next step boundary
(every rank then saves the same step) and stops. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "STOP_FILE_ENV",
    "STOP_SIGNALS",
    "StopSignals",
    "TrainingAborted",
    "TrainingStopped",
    "ignore_stop_signals",
]

# EX_TEMPFAIL (sysexits.h): "temporary failure, retry later": a requeue script can tell a run that saved on a
# signal and can resume (`--resume auto`) from one that failed.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Set by the launcher for the workers under torchrun: rank 0 writes this file after the stop save. torchrun
# reports any worker exit other than 0 as a failure, so the launcher reads the file to exit with the status above.
STOP_FILE_ENV = "XTUNER_VL_STOP_FILE"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals. torchrun signals each rank's whole process
    group, workers included, and a worker killed by SIGTERM fails the rank's next batch before the step it is
    finishing can be saved; the rank shuts its workers down itself when it exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class TrainingAborted(RuntimeError):
    """The trainer stopped the run on purpose (divergence, too many unusable samples); the message says why."""


class TrainingStopped(Exception):
    """Raised by the trainer after it saved on a stop signal; carries the exit status."""

    exit_code = PREEMPTED_EXIT_CODE


class StopSignals:
    """Context manager recording the first stop signal received (``received``: its name, or None)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): signals stay as they are
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
