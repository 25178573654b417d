"""Caller input: validation of secret names, and quoting for messages and log lines.

A secret name is at most 256 bytes of UTF-8, does not start with ``/``, has no empty
or ``..`` segment, and holds no character that could forge or hide text in a log
line or a terminal: no control character (C0, DEL, C1), no format character (bidi
controls such as U+202E, zero-width characters), no line or paragraph separator
(U+2028, U+2029), no surrogate, private-use or unassigned code point. That is:
no character of Unicode general category Cc, Cf, Cs, Co, Cn, Zl or Zp.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from broker.errors import InvalidSecretName

MAX_NAME_BYTES = 256
QUOTE_CHARS = 48
"""Caller input quoted in a message or a log line is cut to this many characters."""
QUOTE_ITEMS = 3
"""A list of caller input quoted in a message shows this many items and the count."""
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validate_secret_name(name: str) -> None:
    """Raise InvalidSecretName unless ``name`` is a well-formed secret name.

    The message says what is wrong and never repeats the name: it is caller input
    and may be crafted to forge log lines.
    """
    if not name:
        raise InvalidSecretName("secret name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidSecretName(f"secret name exceeds {MAX_NAME_BYTES} bytes")
    if not name.isascii() or not name.isprintable():
        for ch in name:
            if unicodedata.category(ch) in _REFUSED_CATEGORIES:
                raise InvalidSecretName(
                    "secret name contains a control character or an invisible one"
                    f" (U+{ord(ch):04X})"
                )
    if name.startswith("/"):
        raise InvalidSecretName("secret name starts with '/'")
    segments = name.split("/")
    if ".." in segments:
        raise InvalidSecretName("secret name contains a '..' segment")
    if "" in segments:
        raise InvalidSecretName("secret name contains an empty segment")


def quoted(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` for a message or a log line: every non-printable character escaped (Python's
    repr: no line break, bidi control or terminal escape survives), cut to ``limit``."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def quoted_list(items: Iterable[str]) -> str:
    """A list of caller input for a message: the first QUOTE_ITEMS quoted, then the count."""
    listed = list(items)
    shown = ", ".join(quoted(item) for item in listed[:QUOTE_ITEMS])
    more = len(listed) - QUOTE_ITEMS
    return f"{shown} and {more} more" if more > 0 else shown
