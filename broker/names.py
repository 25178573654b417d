"""Validation of secret names received from callers."""

from __future__ import annotations

from broker.errors import InvalidSecretName

MAX_NAME_BYTES = 256


def validate_secret_name(name: str) -> None:
    """Raise InvalidSecretName unless ``name`` is a well-formed secret name.

    The message says what is wrong and never repeats the name: it is caller input
    and may be crafted to forge log lines.
    """
    if not name:
        raise InvalidSecretName("secret name is empty")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidSecretName(f"secret name exceeds {MAX_NAME_BYTES} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidSecretName("secret name contains a control character")
    if name.startswith("/"):
        raise InvalidSecretName("secret name starts with '/'")
    segments = name.split("/")
    if ".." in segments:
        raise InvalidSecretName("secret name contains a '..' segment")
    if "" in segments:
        raise InvalidSecretName("secret name contains an empty segment")
