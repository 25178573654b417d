"""The Media Catalog's commands. Broker settings come from the SECRETBROKER_* variables.

python -m catalog config              what Config reads through the broker (never values)
python -m catalog serve [--listen]    the reference HTTP service
python -m catalog token --sub NAME    mint a bearer token with the current JWT key
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from catalog.auth import DEFAULT_GRACE, DEFAULT_LIFETIME, TokenAuthority
from catalog.config import CONFIG_SECRETS, DATABASE_URL, JWT_SECRET_KEY, TMDB_API_KEY, Config
from secretbroker.client import (
    BrokerClientConfig,
    ClientConfigError,
    LiveSecrets,
    SecretsClient,
    SecretUnavailable,
)

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m catalog", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("config", help="say what Config reads through the broker")
    serve = commands.add_parser("serve", help="run the reference HTTP service")
    serve.add_argument("--listen", default="127.0.0.1:8080", help="host:port (port 0: any)")
    serve.add_argument(
        "--jwt-grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="how long tokens signed with the previous JWT key stay valid after a rotation",
    )
    token = commands.add_parser("token", help="mint a bearer token for POST /media")
    token.add_argument("--sub", required=True, help="the token's subject (who it is for)")
    token.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME, metavar="SECONDS")
    args = parser.parse_args(argv)

    try:
        client_config = BrokerClientConfig.from_env(os.environ)
    except ClientConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return EXIT_USAGE
    with SecretsClient(client_config) as client:
        try:
            if args.command == "config":
                return show_config(client)
            if args.command == "token":
                authority = TokenAuthority(client.get_secret, client)
                print(authority.mint(args.sub, lifetime=args.lifetime))  # noqa: T201 - its output
                return 0
            return run_service(client, args.listen, args.jwt_grace)
        except SecretUnavailable as exc:
            print(f"unavailable: {exc}", file=sys.stderr)  # noqa: T201
            return EXIT_UNAVAILABLE


def show_config(client: SecretsClient) -> int:
    config = Config(client)
    for prop, ref in (
        ("database_url", DATABASE_URL),
        ("jwt_secret_key", JWT_SECRET_KEY),
        ("tmdb_api_key", TMDB_API_KEY),
    ):
        value = getattr(config, prop)
        secret = client.get_secret(ref.name)
        stale = ", stale" if secret.stale else ""
        print(  # noqa: T201 - CLI output, never the value
            f"{prop}: {len(value)} characters from {ref.name} "
            f"(version {secret.version}, {secret.source.value}{stale})"
        )
    return 0


def run_service(client: SecretsClient, listen: str, grace: float) -> int:
    from catalog.service import CatalogApp, serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _interrupt)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        print('error: --listen must be "host:port"', file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    live = LiveSecrets(client, CONFIG_SECRETS)
    try:
        live.wait_ready(timeout=30)
        authority = TokenAuthority(live.get_secret, client, grace=grace)
        serve(CatalogApp(live, authority), host, int(port))
    except KeyboardInterrupt:
        pass
    finally:
        # Ctrl-C reaches the whole process group, and a supervisor may follow with SIGTERM:
        # one signal is enough to stop; the next must not interrupt the clean-up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        live.close()
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
