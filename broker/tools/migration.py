"""``python -m broker diff`` and ``migrate``: moving secrets from environment variables into
Vault a category at a time (the ADR's phase 3 canary), run by ops.

Both use an ops Vault token (``VAULT_TOKEN``), never the broker's own login: the broker's
policy may read, and write only its rotating secrets, and a migration is an operator's act.
They read the declared secrets, categories and keys from the broker's config, the values from
the environment under the rollback names (``MEDIA_CATALOG_DATABASE_URL``), and Vault at the
config's addresses and mount.

- ``diff`` compares each declared key by keyed hash (HMAC under a key drawn for the run, so
  not even a digest outlives it) and reports equal, differs, missing in env, or missing in
  Vault, per category. It never prints a value.
- ``migrate --category C`` writes the environment's values of C's secrets into Vault with
  check-and-set: a secret Vault lacks is created (cas 0), one whose values already match is
  left alone, and one Vault holds with other values is refused unless ``--force``, which
  writes the next version over the one it read (keys Vault holds beyond the declared ones are
  kept). ``--dry-run`` says what it would do and writes nothing.

Each action is a record in an audit trail of its own (``--audit-file``, default
``ops-audit.jsonl`` beside the broker's trail, chained with the same key): the broker's trail
has one writer, the broker.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.audit.trail import AuditTrail
from broker.config import BrokerConfig, SecretSpec, TokenAuth
from broker.config_loader import load_config
from broker.config_reader import Sensitive
from broker.errors import BrokerError, ConfigError, SecretMissingInSource, WriteConflict
from broker.sources.env import variable_name
from broker.sources.vault import VaultSource

EQUAL = "equal"
DIFFERS = "differs"
MISSING_IN_ENV = "missing in env"
MISSING_IN_VAULT = "missing in vault"


@dataclass(frozen=True)
class KeyState:
    secret: str
    category: str
    key: str
    state: str


def add_migration_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, required=True, help="the broker's broker.toml")
    common.add_argument("--category", help="only this category (default: every category)")
    common.add_argument(
        "--audit-file",
        type=Path,
        help="ops audit trail (default: ops-audit.jsonl beside audit.file)",
    )
    commands.add_parser(
        "diff",
        parents=[common],
        help="compare env variables with Vault per declared key, by keyed hash (ops VAULT_TOKEN)",
    )
    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="write a category's env values into Vault, check-and-set (ops VAULT_TOKEN)",
    )
    migrate.add_argument("--dry-run", action="store_true", help="say what would be written")
    migrate.add_argument(
        "--force", action="store_true", help="also replace values Vault holds that differ"
    )


def run_migration_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        config = load_config(args.config, environ)
        specs = _specs(config, args.category)
    except ConfigError as exc:
        _error(f"config error: {exc}")
        return 2
    token = environ.get("VAULT_TOKEN")
    if not token:
        _error("VAULT_TOKEN: missing; diff and migrate run with an ops token, never the broker's")
        return 2
    auth = TokenAuth(token_file=None, env_token=Sensitive(token))
    vault = VaultSource(dataclasses.replace(config.vault, auth=auth))
    trail_path = _audit_path(config, args.audit_file)
    try:
        trail_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        trail = AuditTrail(trail_path, key=config.audit.key)
    except OSError as exc:
        _error(f"--audit-file: cannot open {trail_path} ({exc.strerror})")
        vault.session.nodes.close()
        return 2
    try:
        if args.command == "diff":
            return _diff(vault, specs, environ, trail)
        return _migrate(vault, specs, environ, trail, dry_run=args.dry_run, force=args.force)
    except BrokerError as exc:
        _error(str(exc))
        return 1
    finally:
        trail.close()
        vault.session.nodes.close()


def compare(
    vault: VaultSource, specs: list[SecretSpec], environ: Mapping[str, str]
) -> list[KeyState]:
    """Each declared key's state, env against Vault, by HMAC under a key drawn for this call."""
    run_key = secrets.token_bytes(32)

    def digest(value: str) -> bytes:
        return hmac.new(run_key, value.encode(), "sha256").digest()

    states = []
    for spec in specs:
        try:
            held = vault.read_all(spec).data
        except SecretMissingInSource:
            held = {}
        for key in spec.keys:
            env_value = environ.get(variable_name(spec.name, key))
            if not env_value:
                state = MISSING_IN_ENV
            elif key not in held:
                state = MISSING_IN_VAULT
            elif hmac.compare_digest(digest(env_value), digest(held[key])):
                state = EQUAL
            else:
                state = DIFFERS
            states.append(KeyState(spec.name, spec.category, key, state))
    return states


def _diff(
    vault: VaultSource, specs: list[SecretSpec], environ: Mapping[str, str], trail: AuditTrail
) -> int:
    states = compare(vault, specs, environ)
    for category in sorted({s.category for s in states}):
        print(f"category {category}:")  # noqa: T201 - the CLI's own output
        for state in (s for s in states if s.category == category):
            print(f"  {state.secret} {state.key}: {state.state}")  # noqa: T201
    unequal = [s for s in states if s.state != EQUAL]
    trail.record(
        "diff",
        categories=sorted({s.category for s in states}),
        keys=len(states),
        unequal=[f"{s.secret}#{s.key}: {s.state}" for s in unequal],
    )
    return 1 if unequal else 0


def _migrate(
    vault: VaultSource,
    specs: list[SecretSpec],
    environ: Mapping[str, str],
    trail: AuditTrail,
    *,
    dry_run: bool,
    force: bool,
) -> int:
    failed = 0
    for spec in specs:
        action, version = _migrate_one(vault, spec, environ, dry_run=dry_run, force=force)
        print(f"{spec.name}: {action}")  # noqa: T201 - the CLI's own output
        trail.record(
            "migrate",
            secret=spec.name,
            category=spec.category,
            action=action,
            version=version,
            dry_run=dry_run,
            force=force,
        )
        failed += action.startswith(("refused", "failed"))
    return 1 if failed else 0


def _migrate_one(
    vault: VaultSource,
    spec: SecretSpec,
    environ: Mapping[str, str],
    *,
    dry_run: bool,
    force: bool,
) -> tuple[str, int | None]:
    """What was done (or would be), and the version written."""
    names = {key: variable_name(spec.name, key) for key in spec.keys}
    unset = sorted(name for name in names.values() if not environ.get(name))
    if unset:
        return f"refused: {', '.join(unset)} not set; nothing written", None
    values = {key: environ[name] for key, name in names.items()}
    try:
        current = vault.read_all(spec)
    except SecretMissingInSource:
        current = None
    if current is None:
        data, expected, verb = values, 0, "created"
    elif all(current.data.get(key) == value for key, value in values.items()):
        return f"unchanged: vault version {current.version} holds the same values", None
    elif not force:
        return (
            f"refused: vault version {current.version} holds other values;"
            " --force writes the next version over it",
            None,
        )
    else:
        data, expected, verb = {**current.data, **values}, current.version, "updated"
    if dry_run:
        return f"would be {verb} (dry run)", None
    try:
        written = vault.write_version(spec, data, expected_version=expected)
    except WriteConflict:
        return "failed: another writer changed it meanwhile; nothing overwritten, run again", None
    return f"{verb}: version {written.version}", written.version


def _specs(config: BrokerConfig, category: str | None) -> list[SecretSpec]:
    specs = sorted(config.secrets.values(), key=lambda spec: spec.name)
    if category is None:
        return specs
    if category not in config.categories:
        raise ConfigError(
            "--category",
            f"{category!r} is not a category of the config; declared: "
            + ", ".join(sorted(config.categories)),
        )
    return [spec for spec in specs if spec.category == category]


def _audit_path(config: BrokerConfig, given: Path | None) -> Path:
    if given is not None:
        return given
    folder = config.audit.file.parent if config.audit.file is not None else Path(os.getcwd())
    return folder / "ops-audit.jsonl"


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's own output
