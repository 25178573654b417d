"""Reading the config file: a TOML table with typed getters that name the key on error, and
dataclass fields that say how each is read (``seconds(5.0)``: a duration, 5 s when absent).

A config dataclass declares each key once, with its default and its reader, on the field;
``Table.section`` reads a whole dataclass from its table and rejects keys it does not know.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import ConfigError

T = TypeVar("T")
Reader = Callable[["Table", str, Any], Any]
"""How one key is read from its table: (table, name, the field's default) -> value."""


class Sensitive:
    """A credential held in memory. Its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Sensitive(***)"

    __str__ = __repr__


def setting(default: Any, read: Reader) -> Any:
    """A field read from the config file by ``read`` (its default, when the key is absent, is
    the field's: written once, here)."""
    if default is dataclasses.MISSING:
        return field(metadata={"read": read})
    return field(default=default, metadata={"read": read})


def seconds(default: float) -> Any:
    return setting(default, lambda table, name, default: table.duration(name, default))


def positive_seconds(default: float) -> Any:
    return setting(default, lambda table, name, default: table.positive_duration(name, default))


def count(default: int, *, minimum: int = 0) -> Any:
    return setting(default, functools.partial(_integer, minimum=minimum))


def flag(default: bool) -> Any:
    return setting(default, lambda table, name, default: table.boolean(name, default))


def mount_point(default: str) -> Any:
    """A Vault mount point, as given but without slashes around it."""
    return setting(default, lambda table, name, default: table.string(name, default).strip("/"))


def existing_file() -> Any:
    return setting(dataclasses.MISSING, lambda table, name, _: table.path(name))


def optional_file(*, must_exist: bool = True) -> Any:
    return setting(
        None,
        lambda table, name, _: table.path(name, must_exist=must_exist) if table.has(name) else None,
    )


def listen_address(*, required: bool = True) -> Any:
    """host:port to listen on (port 0: any free port); optional: None when absent."""
    return setting(dataclasses.MISSING if required else None, _listen_address)


def _listen_address(table: Table, name: str, default: str | None) -> str | None:
    if default is None and not table.has(name):
        return None
    listen = table.string(name)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(table.full(name), 'must be "host:port"')
    return listen


def choice(default: str, choices: tuple[str, ...], problem: str, *, upper: bool = False) -> Any:
    """One of ``choices`` (compared in upper case with ``upper``); else ``problem``."""

    def read(table: Table, name: str, default: str) -> str:
        value = table.string(name, default)
        value = value.upper() if upper else value
        if value not in choices:
            raise ConfigError(table.full(name), problem)
        return value

    return setting(default, read)


def section_of(cls: type[Any]) -> Any:
    """A whole table read as the dataclass ``cls`` (its defaults when the table is absent)."""
    return setting(cls(), lambda table, name, _: table.table(name, required=False).section(cls))


def file_mode(default: int) -> Any:
    """A file mode in octal ("0640"): read and write for the owner at most, read for the group."""
    return setting(default, _file_mode)


def _file_mode(table: Table, name: str, default: int) -> int:
    text = table.string(name, f"{default:04o}")
    if not re.fullmatch(r"0?[0-7]{3}", text) or int(text, 8) & 0o077 & ~0o044:
        raise ConfigError(table.full(name), 'must be an octal mode like "0600" or "0640"')
    return int(text, 8)


def _integer(table: Table, name: str, default: int, *, minimum: int) -> int:
    return table.integer(name, default, minimum=minimum)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Table:
    """A TOML table under a dotted key, with typed getters that name the key on error."""

    def __init__(self, data: Mapping[str, Any], key: str, base_dir: Path) -> None:
        self._data = data
        self.key = key
        self._base_dir = base_dir
        self._used: set[str] = set()

    def full(self, name: str) -> str:
        """The dotted key of ``name`` in this table, as errors name it."""
        return f"{self.key}.{name}" if self.key else name

    def _raw(self, name: str) -> Any:
        self._used.add(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        """Whether the key is given (reading nothing: it is not marked as used)."""
        return self._data.get(name) is not None

    def skip(self, name: str) -> None:
        """A known key this reading does not use (e.g. overridden by a variable)."""
        self._used.add(name)

    def section(self, cls: type[T], **given: Any) -> T:
        """The dataclass ``cls`` read from this table: each field with a reader (see
        ``_setting``) from its key, the others from ``given``; then any key left is unknown."""
        values = dict(given)
        for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
            read = spec.metadata.get("read")
            if spec.name not in values and read is not None:
                values[spec.name] = read(self, spec.name, spec.default)
        self.reject_unknown()
        return cls(**values)

    def table(self, name: str, *, required: bool = True) -> Table:
        value = self._raw(name)
        if value is None and not required:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(
                self.full(name), "missing table" if value is None else "must be a table"
            )
        return Table(value, self.full(name), self._base_dir)

    def string(self, name: str, default: str | None = None) -> str:
        value = self._raw(name)
        if value is None:
            if default is None:
                raise ConfigError(self.full(name), "missing")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(self.full(name), "must be a non-empty string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.full(name), "must be true or false")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value = self._raw(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(self.full(name), f"must be an integer of at least {minimum}")
        return value

    def strings(self, name: str, *, required: bool = False) -> tuple[str, ...]:
        value = self._raw(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.full(name), "must be a list of non-empty strings")
        if len(set(value)) != len(value):
            raise ConfigError(self.full(name), "lists an entry twice")
        return tuple(value)

    def path(self, name: str, *, must_exist: bool = True) -> Path:
        path = self._base_dir / self.string(name)
        if must_exist and not path.is_file():
            raise ConfigError(self.full(name), f"file not found: {path}")
        return path

    def positive_duration(self, name: str, default: float) -> float:
        seconds = self.duration(name, default)
        if seconds <= 0:
            raise ConfigError(self.full(name), "must be greater than zero")
        return seconds

    def duration(self, name: str, default: float) -> float:
        value = self._raw(name)
        if value is None:
            return default
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds is None or seconds < 0:
            raise ConfigError(
                self.full(name),
                'must be a duration: seconds, or a string like "500ms", "30s", "5m"',
            )
        return seconds

    def items(self) -> list[tuple[str, Any]]:
        self._used.update(self._data)
        return list(self._data.items())

    def reject_unknown(self) -> None:
        for name in self._data:
            if name not in self._used:
                raise ConfigError(self.full(name), "unknown key")
