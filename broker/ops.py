"""Operator commands, clients of SecretBrokerAdmin over mutual TLS with an ops certificate:

    python -m broker status
    python -m broker rollback set '["external", "api"]'   # these from Vault, the rest from env
    python -m broker rollback clear                       # back to the start-up rule
    python -m broker rotate media-catalog/api

Connection settings come from flags or from SECRETBROKER_ADDR, SECRETBROKER_CA_FILE,
SECRETBROKER_CERT_FILE, SECRETBROKER_KEY_FILE and SECRETBROKER_SERVER_NAME.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from secretbroker.client import ENV_PREFIX, BrokerClientConfig, ClientConfigError, secure_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

EXIT_FAILED = 1
EXIT_USAGE = 2

_RULES = {
    broker_pb2.ROLLBACK_RULE_DEFAULT: "default: VAULT_ENABLED_SECRETS is unset, so all from Vault",
    broker_pb2.ROLLBACK_RULE_STARTUP_VARIABLE: "VAULT_ENABLED_SECRETS, read at start-up",
    broker_pb2.ROLLBACK_RULE_OVERRIDE: "live override (wins until `rollback clear`)",
}
_CONNECTION = ("addr", "ca_file", "cert_file", "key_file", "server_name")
"""Flags that override the SECRETBROKER_* variable of the same name."""


def add_ops_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection (default: the SECRETBROKER_* variables)")
    for option in _CONNECTION:
        variable = ENV_PREFIX + option.upper()
        group.add_argument(f"--{option.replace('_', '-')}", default=None, help=f"${variable}")
    commands.add_parser(
        "status", parents=[connection], help="show where each category is served from, and why"
    )
    rollback = commands.add_parser("rollback", help="flip categories between Vault and env, live")
    actions = rollback.add_subparsers(dest="action", required=True)
    set_cmd = actions.add_parser(
        "set", parents=[connection], help="serve these categories from Vault, the rest from env"
    )
    set_cmd.add_argument(
        "vault_enabled",
        metavar="JSON",
        help="categories served from Vault, as in VAULT_ENABLED_SECRETS: '[\"api\"]'",
    )
    actions.add_parser("clear", parents=[connection], help="drop the override: start-up rule")
    rotate = commands.add_parser(
        "rotate", parents=[connection], help="rotate a secret declared rotating, now"
    )
    rotate.add_argument("name")


def run_ops_command(args: argparse.Namespace) -> int:
    try:
        overrides = {option.upper(): getattr(args, option) for option in _CONNECTION}
        channel = secure_channel(BrokerClientConfig.from_env(os.environ, overrides))
    except ClientConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own output
        return EXIT_USAGE
    admin = broker_pb2_grpc.SecretBrokerAdminStub(channel)
    try:
        if args.command == "status":
            state = admin.GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10).state
            print(describe(state))  # noqa: T201
        elif args.command == "rollback" and args.action == "set":
            categories = _categories(args.vault_enabled)
            if categories is None:
                print(  # noqa: T201
                    'error: JSON must be a list of categories, e.g. ["external", "api"]',
                    file=sys.stderr,
                )
                return EXIT_USAGE
            request = broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=categories)
            print(describe(admin.SetRollbackOverride(request, timeout=10).state))  # noqa: T201
        elif args.command == "rollback":
            request_clear = broker_pb2.ClearRollbackOverrideRequest()
            print(describe(admin.ClearRollbackOverride(request_clear, timeout=10).state))  # noqa: T201
        else:
            rotated = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=args.name), timeout=30)
            print(  # noqa: T201
                f"rotated {rotated.name}: version {rotated.version},"
                f" written {_when(rotated.created_at)}"
            )
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILED
    finally:
        channel.close()
    return 0


def describe(state: broker_pb2.RollbackState) -> str:
    startup = state.startup_variable if state.HasField("startup_variable") else "unset"
    lines = [
        f"from vault: {', '.join(state.vault_enabled_categories) or '(none)'}",
        f"from env:   {', '.join(state.env_categories) or '(none)'}",
        f"rule in force: {_RULES.get(state.rule, 'unknown')}",
        f"VAULT_ENABLED_SECRETS at start-up: {startup}",
    ]
    if state.HasField("override"):
        override = state.override
        lines.append(
            f"override: {json.dumps(list(override.vault_enabled_categories))}"
            f" set by {override.set_by} at {_when(override.set_at)}"
        )
    for missing in state.missing_env:
        effect = "reads FAIL now" if missing.served_from_env else "a rollback would fail"
        lines.append(
            f"env variables not set for {missing.secret} ({missing.category}, {effect}):"
            f" {', '.join(missing.variables)}"
        )
    return "\n".join(lines)


def _categories(raw: str) -> list[str] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _when(stamp: Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="seconds")
