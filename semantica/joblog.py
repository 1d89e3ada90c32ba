"""Reading a job's log file (`logs/<job_id>.log`): its last lines, or what follows an
offset. Used by the daemon's `logs.tail.v1` and by the CLI when the daemon is down."""

from __future__ import annotations

import os
from pathlib import Path

CHUNK_MAX_BYTES = 1024 * 1024
TAIL_MAX_LINES = 100_000  # the most lines one logs.tail.v1 asks for


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lines_of(data: bytes) -> list[str]:
    """The lines of log bytes, split at newlines only (a carriage return or a form
    feed inside a line stays in it, so `n` lines are n newlines); a CRLF ending is
    taken off like the LF."""
    parts = data.decode("utf-8", "replace").split("\n")
    if parts[-1] == "":
        parts.pop()
    return [part.removesuffix("\r") for part in parts]


def read_from(path: Path, offset: int, *, to_end: bool = False) -> tuple[bytes, int]:
    """Whole lines after `offset` (up to 1 MiB), and the offset after them. With
    `to_end` (the job has ended, nothing more will be written) a last line without
    its newline is included too. An offset at or past the end reads nothing."""
    try:
        with open(path, "rb") as f:
            if offset >= os.fstat(f.fileno()).st_size:  # no seek past what a file can hold
                return b"", offset
            f.seek(offset)
            data = f.read(CHUNK_MAX_BYTES)
    except FileNotFoundError:
        return b"", offset
    full = len(data) == CHUNK_MAX_BYTES
    if to_end and not full:
        return data, offset + len(data)
    cut = data.rfind(b"\n") + 1
    if cut == 0 and full:  # one line longer than a chunk: hand it over in pieces
        cut = len(data)
    return data[:cut], offset + cut


def last_lines(path: Path, n: int) -> tuple[list[str], int]:
    """The last `n` lines of a file (at most its last 1 MiB), reading backwards only
    as far as needed."""
    if n == 0:
        return [], file_size(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            floor = max(0, size - CHUNK_MAX_BYTES)
            block, data = 65536, b""
            while size - len(data) > floor and data.count(b"\n") <= n:
                start = max(floor, size - len(data) - block)
                f.seek(start)
                data = f.read(size - len(data) - start) + data
    except FileNotFoundError:
        return [], 0
    return lines_of(data)[-n:], size
