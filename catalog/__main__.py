"""The Media Catalog's commands. Broker settings come from the SECRETBROKER_* variables.

python -m catalog config              what Config reads through the broker (never values)
python -m catalog serve [--listen]    the reference HTTP service (FastAPI on uvicorn)
python -m catalog token --sub NAME    mint a bearer token with the current JWT key
"""

from __future__ import annotations

import argparse
import os
import sys

from catalog.auth import DEFAULT_GRACE, DEFAULT_LIFETIME, TokenAuthority
from catalog.config import CONFIG_PROPERTIES, Config
from secretbroker.client import (
    BrokerClientConfig,
    ClientConfigError,
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
    if args.command == "serve":
        return run_service(client_config, args.listen, args.jwt_grace)
    with SecretsClient(client_config) as client:
        try:
            if args.command == "config":
                return show_config(client)
            authority = TokenAuthority(client.get_secret)
            print(authority.mint(args.sub, lifetime=args.lifetime))  # noqa: T201 - its output
            return 0
        except SecretUnavailable as exc:
            print(f"unavailable: {exc}", file=sys.stderr)  # noqa: T201
            return EXIT_UNAVAILABLE


def show_config(client: SecretsClient) -> int:
    config = Config(client)
    for prop, ref in CONFIG_PROPERTIES.items():
        value = getattr(config, prop)
        secret = client.get_secret(ref.name)
        stale = ", stale" if secret.stale else ""
        print(  # noqa: T201 - CLI output, never the value
            f"{prop}: {len(value)} characters from {ref.name} "
            f"(version {secret.version}, {secret.source.value}{stale})"
        )
    return 0


def run_service(client_config: BrokerClientConfig, listen: str, grace: float) -> int:
    """uvicorn serves the app until SIGINT or SIGTERM, then lets requests in flight finish."""
    import uvicorn

    from catalog.logs import background_logging
    from catalog.service import create_app, from_broker

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        print('error: --listen must be "host:port"', file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    app = create_app(from_broker(client_config, grace))
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=int(port), log_config=None, lifespan="on")
    )
    with background_logging():
        server.run()
    return 0 if server.started else EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
