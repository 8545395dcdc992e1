"""I/O failures that say what happened: the path, the cause, and the free space when writing."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CheckpointIOError", "io_errors_named"]


class CheckpointIOError(OSError):
    """Writing or reading a checkpoint failed; the message names the path and the cause."""

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


_NEARLY_FULL = 64 << 20  # bytes: less than this free, and a failed write is a full disk


def _free_space(path: Path) -> str:
    for candidate in (path, *path.parents):
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            full = "No space left on device: " if free < _NEARLY_FULL else ""
            return f"{full}{free / 2**30:.2f} GiB free on the file system of {candidate}"
    return "free space unknown"


# What torch's zip writer (caffe2/serialize/inline_container.cc) says when a write fails, e.g. on a full disk:
# "basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file ...: file write failed", or an
# "unexpected pos" enforce failure at its end of file.
_STREAM_ERRORS = ("iostream error", "PytorchStreamWriter", "file write failed", "inline_container.cc")


def _is_stream_error(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, RuntimeError) and any(marker in str(e) for marker in _STREAM_ERRORS):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def io_errors_named(path: Path, writing: bool = True) -> Iterator[None]:
    """Re-raise an ``OSError`` (or the C++ stream errors torch's writer raises as ``RuntimeError``, e.g.
    ``basic_ios::clear: iostream error`` on a full disk) as one :class:`CheckpointIOError` naming ``path``."""
    try:
        yield
    except CheckpointIOError:
        raise
    except OSError as e:
        cause = e.strerror or str(e)
        where = e.filename or path
        space = f"; {_free_space(Path(path))}" if writing or e.errno == errno.ENOSPC else ""
        raise CheckpointIOError(e.errno, f"{'writing' if writing else 'reading'} {where} failed: {cause}{space}") from e
    except RuntimeError as e:
        if not _is_stream_error(e):
            raise
        raise CheckpointIOError(
            errno.EIO, f"writing {path} failed ({str(e).splitlines()[0]}); {_free_space(Path(path))}"
        ) from e
