"""The audit trail's chain: how each record points at the one before it, and its verification.

Each record's ``prev`` holds the link to the previous record's line:

- unkeyed (the old form, still verified): the SHA-256 of the line, 64 hex digits, the first
  record's ``prev`` being 64 zeros. Anyone who rewrites the tail can recompute it.
- keyed: ``hmac:KID:MAC``, the HMAC-SHA256 of the line under the audit key, the first
  record's being the HMAC of the empty line. Nobody without the key can recompute it. KID
  names the key (8 hex digits of a hash of it, nothing that helps guess it), so a trail
  written across a key rotation verifies with both keys.

A keyed trail never goes back to unkeyed links: a record after a keyed one that has a plain
hash was forged by someone without the key. The chain runs across rotated files (``seq``
and ``prev`` continue); ``verify`` takes the files in the order of their first ``seq``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GENESIS = "0" * 64
KEY_MIN_BYTES = 32
_KEYED = "hmac:"


@dataclass(frozen=True)
class ChainKey:
    """An audit key. Its bytes never appear in a repr, a log line or a record."""

    secret: bytes = field(repr=False)

    @property
    def kid(self) -> str:
        return hashlib.sha256(b"secretbroker audit key id\0" + self.secret).hexdigest()[:8]

    def link(self, line: bytes) -> str:
        mac = hmac.new(self.secret, line.rstrip(b"\n"), hashlib.sha256).hexdigest()
        return f"{_KEYED}{self.kid}:{mac}"

    def __repr__(self) -> str:
        return f"ChainKey(kid={self.kid})"


class KeyFileError(Exception):
    """The key file cannot serve as an audit key; the message says why, never its content."""


def load_key(path: Path) -> ChainKey:
    """The key in ``path``: readable by its owner only, at least KEY_MIN_BYTES after trimming
    surrounding white space (so ``openssl rand -hex 32 > key`` works as it is).

    As PostgreSQL allows for its key file, a file root owns may also be readable by its group
    (0640, 0440): that is how Kubernetes mounts a Secret for a non-root pod (root-owned, group
    fsGroup). Never by others, and never writable by the group."""
    try:
        stat = path.stat()
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path} ({exc.strerror})") from None
    mode = stat.st_mode & 0o777
    allowed = 0o037 if stat.st_uid == 0 else 0o077
    if mode & allowed:
        raise KeyFileError(
            f"{path} must be readable by its owner only (mode 0600, not {mode:04o}; a file root"
            " owns may be readable by its group too, 0640)"
        )
    if len(secret) < KEY_MIN_BYTES:
        raise KeyFileError(f"{path} holds fewer than {KEY_MIN_BYTES} bytes")
    return ChainKey(secret)


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def link(line: bytes, key: ChainKey | None) -> str:
    """What the record after ``line`` holds as its ``prev``."""
    return key.link(line) if key is not None else line_hash(line)


def genesis(key: ChainKey | None) -> str:
    """The ``prev`` of a chain's first record."""
    return key.link(b"") if key is not None else GENESIS


@dataclass(frozen=True)
class ChainBreak:
    where: str
    """FILE:LINE of the record named."""
    problem: str


@dataclass(frozen=True)
class _Line:
    where: str
    text: bytes


def _fields(line: bytes) -> tuple[int, str] | None:
    try:
        record = json.loads(line)
        return int(record["seq"]), str(record["prev"])
    except (ValueError, KeyError, TypeError):
        return None


def trail_files(paths: Iterable[Path]) -> list[Path]:
    """The files to verify: folders stand for the regular files in them; ordered by the
    ``seq`` of their first record (rotation schemes number files either way)."""
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]

    def first_seq(path: Path) -> int:
        with path.open("rb") as file:
            for line in file:
                if line.strip():
                    fields = _fields(line)
                    return fields[0] if fields else 0
        return 0

    return sorted(files, key=first_seq)


def verify_files(
    paths: Sequence[Path], keys: Sequence[ChainKey] = ()
) -> tuple[int, ChainBreak | None]:
    """Walk the chain through ``paths`` (see trail_files); how many records check out, and the
    first break, if any. Raises OSError for an unreadable file."""
    lines: list[_Line] = []
    for path in trail_files(paths):
        with path.open("rb") as file:
            numbered = [line for line in file if line.strip()]
        lines += [_Line(f"{path}:{number}", text) for number, text in enumerate(numbered, 1)]
    return verify(lines, {key.kid: key for key in keys})


def verify(lines: Sequence[_Line], keys: dict[str, ChainKey]) -> tuple[int, ChainBreak | None]:
    prev: bytes | None = None  # the previous line; None before the first record
    expected_seq = 1
    keyed = False
    for index, line in enumerate(lines):
        fields = _fields(line.text)
        if fields is None:
            return index, ChainBreak(
                line.where, "is not an audit record (edited, or cut by a crash)"
            )
        seq, recorded = fields
        if seq > expected_seq:
            missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
            return index, ChainBreak(line.where, f"follows a gap: record {missing} was deleted")
        if seq < expected_seq:
            return index, ChainBreak(line.where, f"repeats record number {seq}: it was inserted")
        key: ChainKey | None = None
        if recorded.startswith(_KEYED):
            kid = recorded[len(_KEYED) :].partition(":")[0]
            key = keys.get(kid)
            if key is None:
                return index, ChainBreak(
                    line.where, f"is chained with audit key {kid}: give that key (--key-file)"
                )
            keyed = True
        elif keyed:
            return index, ChainBreak(
                line.where, "has an unkeyed link after keyed ones: written without the key"
            )
        if prev is None:
            if recorded != genesis(key):
                return 0, ChainBreak(
                    line.where, "does not start a chain: the trail's start was cut"
                )
        elif recorded != link(prev, key):
            return _misfit(lines, index, seq, keys)
        prev, expected_seq = line.text, seq + 1
    return len(lines), None


def _misfit(
    lines: Sequence[_Line], index: int, seq: int, keys: dict[str, ChainKey]
) -> tuple[int, ChainBreak]:
    """Record ``index``'s link does not fit the record before it: name the record that was
    changed. Either the one before was edited (so its link changed), or this one was; the
    next record's link, which covers this one, tells which."""
    line, before = lines[index], lines[index - 1]
    following = _fields(lines[index + 1].text) if index + 1 < len(lines) else None
    if following is None:
        problem = "was edited, or the last record after it was: nothing follows to tell which"
        return index - 1, ChainBreak(before.where, problem)
    if following[0] == seq:  # the next line is the real record this one displaced
        return index, ChainBreak(
            line.where, "was inserted: the next record follows its predecessor"
        )
    if following[1] == _link_like(following[1], line.text, keys):
        problem = "was edited: its link is not the one the next record holds"
        return index - 1, ChainBreak(before.where, problem)
    return index, ChainBreak(line.where, "was edited: its prev is not the previous record's link")


def _link_like(recorded: str, line: bytes, keys: dict[str, ChainKey]) -> str | None:
    """The link to ``line`` in the form ``recorded`` has (keyed with its key, or unkeyed)."""
    if not recorded.startswith(_KEYED):
        return line_hash(line)
    key = keys.get(recorded[len(_KEYED) :].partition(":")[0])
    return key.link(line) if key is not None else None
