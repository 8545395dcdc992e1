"""Lazy annotation index over LLaVA-style ``.json`` (a list) or ``.jsonl`` files.

Start-up only finds where each record is; records are decoded per sample in the workers. Every
error names ``file:line``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AnnotationError", "AnnotationFile"]


class AnnotationError(ValueError):
    """A problem in an annotation file, located by ``path`` and 1-based ``line``."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def _jsonl_offsets(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of a ``.jsonl`` file."""
    offsets, lines = [], []
    pos = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                offsets.append(pos)
                lines.append(number)
            pos += len(raw)
    return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _json_array_spans(path: Path, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Character offsets and 1-based line numbers of the items of a top-level JSON list."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = len(text) - len(text.lstrip(ws))
    if not text[pos : pos + 1] == "[":
        raise AnnotationError(path, 1, "a .json annotation file must hold a list of samples (use .jsonl for lines)")
    pos += 1
    starts: list[int] = []
    lines: list[int] = []
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if text[pos : pos + 1] == "]":
            break
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise AnnotationError(path, e.lineno, f"invalid JSON ({e.msg}, column {e.colno})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        starts.append(pos)
        lines.append(line)
        pos = end
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if text[pos : pos + 1] == ",":
            pos += 1
        elif text[pos : pos + 1] != "]":
            line = text.count("\n", 0, pos) + 1
            raise AnnotationError(path, line, "invalid JSON (expected ',' or ']' between samples)")
    return np.asarray(starts, dtype=np.int64), np.asarray(lines, dtype=np.int64)


@dataclass
class AnnotationFile:
    """Where the records of one annotation file are; :meth:`record` decodes one on demand."""

    path: Path
    offsets: np.ndarray
    lines: np.ndarray
    _text: str | None = None  # the decoded file, kept for .json lists only
    _fh: Any = field(default=None, repr=False, compare=False)
    _fh_pid: int | None = field(default=None, repr=False, compare=False)

    @classmethod
    def scan(cls, path: str | Path) -> AnnotationFile:
        path = Path(path)
        if not path.is_file():
            raise AnnotationError(path, None, "annotation file not found")
        if path.suffix == ".jsonl":
            offsets, lines = _jsonl_offsets(path)
            return cls(path, offsets, lines)
        if path.suffix != ".json":
            raise AnnotationError(path, None, "annotation files must end in .json (a list) or .jsonl (one per line)")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise AnnotationError(path, line, f"not UTF-8 (byte {raw[e.start]:#x} at offset {e.start})") from None
        offsets, lines = _json_array_spans(path, text)
        return cls(path, offsets, lines, text)

    def __len__(self) -> int:
        return len(self.offsets)

    def line_of(self, i: int) -> int:
        return int(self.lines[i])

    def _handle(self):
        """One open handle per process (a forked DataLoader worker opens its own), instead of one per record."""
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        return self._fh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fh": None, "_fh_pid": None}

    def record(self, i: int) -> dict[str, Any]:
        """Decode record ``i``; raises :class:`AnnotationError` naming its line."""
        line = self.line_of(i)
        if self._text is not None:
            obj, _ = json.JSONDecoder().raw_decode(self._text, int(self.offsets[i]))
        else:
            f = self._handle()
            f.seek(int(self.offsets[i]))
            raw = f.readline()
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise AnnotationError(self.path, line, f"not UTF-8 (byte {raw[e.start]:#x})") from None
            except json.JSONDecodeError as e:
                raise AnnotationError(self.path, line, f"invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise AnnotationError(self.path, line, f"a sample must be a JSON object, got {type(obj).__name__}")
        return obj
