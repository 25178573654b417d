"""Command line: ``python -m broker serve --config broker.toml``, ``vault-policy``, ``audit
verify``, the operator commands ``status``, ``rollback`` and ``rotate`` (broker/tools/ops.py),
and the migration commands ``diff`` and ``migrate`` (broker/tools/migration.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from broker.audit.chain import KeyFileError, load_key, verify_files
from broker.config import BrokerConfig
from broker.config_loader import load_config
from broker.errors import ConfigError
from broker.observe.logs import NativeStderr, route_native_stderr
from broker.tools.migration import add_migration_commands, run_migration_command
from broker.tools.ops import add_ops_commands, run_ops_command
from broker.tools.vault_policy import vault_policy

EXIT_CONFIG_ERROR = 2
EXIT_BACKGROUND_TASK_DIED = 70
"""A background task of the broker died (logged CRITICAL): the orchestrator restarts it."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the broker")
    serve_cmd.add_argument("--config", type=Path, required=True, help="path to broker.toml")
    policy_cmd = commands.add_parser(
        "vault-policy", help="print the least-privilege Vault policy for a broker config"
    )
    policy_cmd.add_argument("--config", type=Path, required=True, help="path to broker.toml")
    add_ops_commands(commands)
    add_migration_commands(commands)
    audit = commands.add_parser("audit", help="check an audit trail file")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    verify_cmd = audit_actions.add_parser(
        "verify", help="check the hash chain; report the first edited, inserted or deleted record"
    )
    verify_cmd.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="trail files, or folders of them (rotated files chain on, in the order of their seq)",
    )
    verify_cmd.add_argument(
        "--key-file",
        type=Path,
        action="append",
        default=[],
        help="an audit key the trail is chained with (repeat it for a trail across key rotations)",
    )
    args = parser.parse_args(argv)

    if args.command == "audit":
        return verify_audit(args.paths, args.key_file)
    if args.command in ("status", "rollback", "rotate"):
        return run_ops_command(args)
    if args.command in ("diff", "migrate"):
        return run_migration_command(args, os.environ)
    if args.command == "vault-policy":
        try:
            print(vault_policy(load_config(args.config, os.environ)), end="")  # noqa: T201
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)  # noqa: T201
            return EXIT_CONFIG_ERROR
        return 0
    json_logs = False
    native: NativeStderr | None = None
    try:
        config = load_config(args.config, os.environ)
        json_logs = config.log.format == "json"
        native = route_native_stderr(config.log.level, config.log.format)
        died = asyncio.run(serve(config, native))
    except ConfigError as exc:  # from the file, the environment, the TLS files, the listeners
        if native is not None:
            native.close()  # gRPC core's own lines about it first
        if json_logs:  # every line on stderr is JSON once the config asked for it
            logging.getLogger("broker").critical("config error: %s", exc)
        else:
            print(f"config error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own output
        return EXIT_CONFIG_ERROR
    if native is not None:
        native.close()
    return EXIT_BACKGROUND_TASK_DIED if died is not None else 0


def verify_audit(paths: list[Path], key_files: list[Path]) -> int:
    try:
        keys = [load_key(path) for path in key_files]
        checked, broken = verify_files(paths, keys)
    except KeyFileError as exc:
        print(f"error: --key-file: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG_ERROR
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG_ERROR
    if broken is None:
        print(f"ok: {checked} records, the chain is intact")  # noqa: T201
        return 0
    print(f"{broken.where}: {broken.problem} ({checked} records before it check out)")  # noqa: T201
    return 1


async def serve(config: BrokerConfig, native: NativeStderr) -> str | None:
    """Run until SIGINT or SIGTERM, then drain in-flight requests and stop. Returns the name
    of a background task that died, which stopped it instead."""
    from broker.server import Broker

    broker = Broker(config, environ=os.environ)
    native.on_handshake_failure = broker.metrics.tls_handshake_failed
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, broker.audit.reopen)  # after a log rotator's move
    stopped = asyncio.ensure_future(stop.wait())
    ended = asyncio.ensure_future(broker.wait())
    await asyncio.wait((stopped, ended), return_when=asyncio.FIRST_COMPLETED)
    died = ended.result() if ended.done() else None
    stopped.cancel()
    ended.cancel()
    await broker.stop(delay=0 if died is not None else None)
    return died
