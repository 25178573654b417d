"""Operator commands, clients of SecretBrokerAdmin over mutual TLS with an ops certificate:

    python -m broker status
    python -m broker rollback set '["external", "api"]'   # these from Vault, the rest from env
    python -m broker rollback clear                       # back to the start-up rule
    python -m broker rotate media-catalog/api

Connection settings come from flags or from SECRETBROKER_ADDR, SECRETBROKER_CA_FILE,
SECRETBROKER_CERT_FILE, SECRETBROKER_KEY_FILE and SECRETBROKER_SERVER_NAME.

Each replica keeps its own rollback override, so ``status`` and ``rollback`` talk to every
replica behind the address (broker/tools/replicas.py), each on its own channel: they show each
replica's state, and exit 1 naming every replica that did not answer or that disagrees.
Nothing here needs Vault: a flip works while Vault is down, which is when it is needed.
``rotate`` goes to any one replica: the new version is in Vault, and the others follow it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker.tools.replicas import Replica, resolve_replicas
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


Answer = broker_pb2.RollbackState | broker_pb2.GetRollbackStateResponse
"""A flip answers with the state; status with the state and the Vault nodes as seen."""
AdminCall = Callable[[broker_pb2_grpc.SecretBrokerAdminStub], Answer]


def run_ops_command(args: argparse.Namespace) -> int:
    try:
        overrides = {option.upper(): getattr(args, option) for option in _CONNECTION}
        config = BrokerClientConfig.from_env(os.environ, overrides)
        if args.command == "rotate":
            return _rotate(config, args.name)
        call = _rollback_call(args)
        if call is None:
            _error('JSON must be a list of categories, e.g. ["external", "api"]')
            return EXIT_USAGE
        replicas = resolve_replicas(config)
    except ClientConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    with ThreadPoolExecutor(min(16, len(replicas))) as pool:
        answers = list(pool.map(lambda replica: _ask(replica, call), replicas))
    return _report(args.command, replicas, answers)


def _rollback_call(args: argparse.Namespace) -> AdminCall | None:
    if args.command == "status":
        request = broker_pb2.GetRollbackStateRequest()
        return lambda admin: admin.GetRollbackState(request, timeout=10)
    if args.action == "set":
        categories = _categories(args.vault_enabled)
        if categories is None:
            return None
        flip = broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=categories)
        return lambda admin: admin.SetRollbackOverride(flip, timeout=10).state
    clear = broker_pb2.ClearRollbackOverrideRequest()
    return lambda admin: admin.ClearRollbackOverride(clear, timeout=10).state


def _ask(replica: Replica, call: AdminCall) -> Answer | str:
    """The replica's state after ``call``, or why it did not answer."""
    channel = secure_channel(replica.config, routed=False)
    try:
        return call(broker_pb2_grpc.SecretBrokerAdminStub(channel))
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    finally:
        channel.close()


def _report(command: str, replicas: list[Replica], answers: list[Answer | str]) -> int:
    """Print each replica's state; exit 1 when one did not answer or the replicas disagree."""
    several = len(replicas) > 1
    for replica, answer in zip(replicas, answers, strict=True):
        if several:
            print(f"== replica {replica.endpoint} ==")  # noqa: T201 - the CLI's own output
        if isinstance(answer, str):
            _error(f"{replica.endpoint}: {answer}" if several else answer)
        elif isinstance(answer, broker_pb2.GetRollbackStateResponse):
            print(describe(answer.state))  # noqa: T201
            print(describe_vault_nodes(answer.vault_nodes))  # noqa: T201
        else:
            print(describe(answer))  # noqa: T201
    failed = [r.endpoint for r, a in zip(replicas, answers, strict=True) if isinstance(a, str)]
    states = {
        replica.endpoint: _where_served(answer)
        for replica, answer in zip(replicas, answers, strict=True)
        if not isinstance(answer, str)
    }
    if failed and several:
        what = "not applied on" if command == "rollback" else "no answer from"
        _error(f"{what} {len(failed)} of {len(replicas)} replicas: {', '.join(failed)}")
    if len(set(states.values())) > 1:
        _error(
            "the replicas disagree on where categories are served from: "
            + "; ".join(f"{endpoint}: {where}" for endpoint, where in states.items())
        )
        return EXIT_FAILED
    if failed:
        return EXIT_FAILED
    if several:
        print(f"all {len(replicas)} replicas agree")  # noqa: T201
    return 0


def _where_served(answer: Answer) -> str:
    state = answer.state if isinstance(answer, broker_pb2.GetRollbackStateResponse) else answer
    return f"vault [{', '.join(state.vault_enabled_categories)}]"


_ROLES = {
    broker_pb2.VAULT_NODE_ROLE_ACTIVE: "active",
    broker_pb2.VAULT_NODE_ROLE_STANDBY: "standby",
    broker_pb2.VAULT_NODE_ROLE_SEALED: "SEALED",
    broker_pb2.VAULT_NODE_ROLE_UNINITIALIZED: "NOT INITIALISED",
}


def describe_vault_nodes(nodes: Sequence[broker_pb2.VaultNode]) -> str:
    """One line per Vault node as the broker's last health probe saw it."""
    if not nodes:
        return "vault nodes: not probed yet"
    lines = [f"vault nodes ({sum(n.reachable for n in nodes)} of {len(nodes)} answering):"]
    for node in nodes:
        role = _ROLES.get(node.role, "unknown") if node.reachable else "NOT ANSWERING"
        lines.append(f"  {node.address}  {role}")
    return "\n".join(lines)


def _rotate(config: BrokerClientConfig, name: str) -> int:
    channel = secure_channel(config)  # any replica that takes traffic
    try:
        admin = broker_pb2_grpc.SecretBrokerAdminStub(channel)
        rotated = admin.RotateSecret(broker_pb2.RotateSecretRequest(name=name), timeout=30)
    except grpc.RpcError as exc:
        _error(f"{exc.code().name}: {exc.details()}")
        return EXIT_FAILED
    finally:
        channel.close()
    print(  # noqa: T201
        f"rotated {rotated.name}: version {rotated.version}, written {_when(rotated.created_at)}"
    )
    return 0


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's own output


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
