"""Secrets from the broker's own environment variables: the ADR's rollback path.

Each declared key of a secret is one variable: the secret's name and the key,
upper-cased, every run of other characters turned into ``_``, so
``media-catalog/database`` key ``url`` is ``MEDIA_CATALOG_DATABASE_URL``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

from broker.config import SecretSpec
from broker.errors import SourceUnavailable
from broker.sources.base import SecretValue, SourceKind

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")


def variable_name(secret: str, key: str) -> str:
    return _NOT_ALNUM.sub("_", f"{secret}_{key}").strip("_").upper()


class EnvSource:
    """Reads a secret's declared keys from ``environ``. Cheap: runs on the event loop."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def missing(self, spec: SecretSpec) -> list[str]:
        """The names of the secret's variables that are unset or empty."""
        return sorted(
            var
            for var in (variable_name(spec.name, key) for key in spec.keys)
            if not self._environ.get(var)
        )

    def read(self, spec: SecretSpec) -> SecretValue:
        names = {key: variable_name(spec.name, key) for key in spec.keys}
        missing = self.missing(spec)
        if missing:
            raise SourceUnavailable(
                f"secret is served from environment variables, and {', '.join(missing)}"
                f" {'is' if len(missing) == 1 else 'are'} not set"
            )
        return SecretValue(
            data={key: self._environ[var] for key, var in names.items()},
            version=0,
            source=SourceKind.ENV,
            fetched_at=time.time(),
        )
