"""``python -m catalog config``: read the catalog's Config through the broker and say what came
back (version, source, length), never the values. Settings come from SECRETBROKER_* variables."""

from __future__ import annotations

import argparse
import os
import sys

from catalog.config import DATABASE_URL, JWT_SECRET_KEY, TMDB_API_KEY, Config
from catalog.secrets import BrokerClientConfig, ClientConfigError, SecretsClient, SecretUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catalog", description=__doc__)
    parser.add_argument("command", choices=["config"])
    parser.parse_args(argv)
    try:
        client_config = BrokerClientConfig.from_env(os.environ)
    except ClientConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    with SecretsClient(client_config) as client:
        config = Config(client)
        for prop, ref in (
            ("database_url", DATABASE_URL),
            ("jwt_secret_key", JWT_SECRET_KEY),
            ("tmdb_api_key", TMDB_API_KEY),
        ):
            try:
                value = getattr(config, prop)
                secret = client.get_secret(ref.name)
            except SecretUnavailable as exc:
                print(f"{prop}: unavailable: {exc}", file=sys.stderr)  # noqa: T201
                return 1
            stale = ", stale" if secret.stale else ""
            print(  # noqa: T201 - CLI output, never the value
                f"{prop}: {len(value)} characters from {ref.name} "
                f"(version {secret.version}, {secret.source.value}{stale})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
