"""Whether files changed: the stamps that certificate reloading compares."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

FileStamp = tuple[int, int, int] | None
"""Modification time, size and inode of a file; None when it cannot be read."""


def file_stamps(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    """One stamp per path: a rename over the file, or a rewrite, changes it."""
    return tuple(_stamp(path) for path in paths)


def _stamp(path: Path) -> FileStamp:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)
