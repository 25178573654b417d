"""`python -m broker diff` and `migrate` against a real OpenBao: the ADR's canary migration
from environment variables into Vault, by an ops token, check-and-set, never printing a value."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from broker.sources.env import variable_name
from devstack.harness import broker_command
from tests.support import API, DATABASE, KV_MOUNT, Pki, Vault, broker_settings, write_config

NEW = "media-catalog/new"
"""Declared in the config, not yet in Vault: what a migration creates."""


def broker_config(vault: Vault, pki: Pki, tmp_path: Path) -> Path:
    document = broker_settings(
        vault,
        pki,
        secrets_={
            DATABASE: {"category": "database"},
            API: {"category": "api"},
            NEW: {"category": "external"},
        },
        audit={"file": str(tmp_path / "audit" / "broker.jsonl")},
    )
    return write_config(tmp_path / "broker.toml", document)


def run(
    config: Path, vault: Vault, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return broker_command(
        *args,
        "--config",
        str(config),
        env={"VAULT_TOKEN": vault.server.root_token, **env},
        timeout=60,
    )


def env_of(name: str, **values: str) -> dict[str, str]:
    return {variable_name(name, key): value for key, value in values.items()}


def test_diff_reports_each_key_by_category_and_never_a_value(
    private_vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    config = broker_config(private_vault, pki, tmp_path)
    database = private_vault.written[DATABASE]
    env = {
        **env_of(DATABASE, **database),
        **env_of(API, value="not-what-vault-holds"),
        **env_of(NEW, value="only-in-env", other="only-in-env-too"),
    }

    result = run(config, private_vault, env, "diff")

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "category database:" in lines
    assert f"  {DATABASE} value: equal" in lines
    assert f"  {DATABASE} other: equal" in lines
    assert f"  {API} value: differs" in lines
    assert f"  {API} other: missing in env" in lines
    assert f"  {NEW} value: missing in vault" in lines
    printed = result.stdout + result.stderr + (tmp_path / "audit" / "ops-audit.jsonl").read_text()
    shown = [v for v in [*env.values(), *private_vault.written[API].values()] if v in printed]
    assert not shown, "diff printed a value"


def test_migrate_creates_then_leaves_alone_then_refuses_a_differing_vault_without_force(
    private_vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    config = broker_config(private_vault, pki, tmp_path)
    env = env_of(NEW, value="from-env", other="from-env-too")
    kv = private_vault.admin.secrets.kv.v2

    def vault_values() -> dict[str, str]:
        read = kv.read_secret_version(path=NEW, mount_point=KV_MOUNT, raise_on_deleted_version=True)
        return dict(read["data"]["data"])

    dry = run(config, private_vault, env, "migrate", "--category", "external", "--dry-run")
    assert dry.stdout.strip() == f"{NEW}: would be created (dry run)"
    assert NEW not in private_vault.written

    created = run(config, private_vault, env, "migrate", "--category", "external")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"{NEW}: created: version 1"
    assert vault_values() == {"value": "from-env", "other": "from-env-too"}
    again = run(config, private_vault, env, "migrate", "--category", "external")
    assert again.stdout.strip() == f"{NEW}: unchanged: vault version 1 holds the same values"

    kv.create_or_update_secret(
        path=NEW,
        secret={**vault_values(), "value": "newer-in-vault", "undeclared": "kept"},
        mount_point=KV_MOUNT,
    )
    refused = run(config, private_vault, env, "migrate", "--category", "external")
    assert refused.returncode == 1
    assert "refused: vault version 2 holds other values" in refused.stdout
    assert vault_values()["value"] == "newer-in-vault", "nothing overwritten without --force"

    forced = run(config, private_vault, env, "migrate", "--category", "external", "--force")
    assert forced.stdout.strip() == f"{NEW}: updated: version 3"
    assert vault_values() == {"value": "from-env", "other": "from-env-too", "undeclared": "kept"}

    trail = tmp_path / "audit" / "ops-audit.jsonl"
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [r["action"] for r in records if r.get("event") == "migrate"] == [
        "would be created (dry run)",
        "created: version 1",
        "unchanged: vault version 1 holds the same values",
        "refused: vault version 2 holds other values; --force writes the next version over it",
        "updated: version 3",
    ]
    assert "from-env" not in trail.read_text()
    verify = broker_command("audit", "verify", str(trail))
    assert verify.returncode == 0, verify.stdout


def test_migrate_needs_an_ops_token_every_variable_and_a_declared_category(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    config = broker_config(vault, pki, tmp_path)
    no_token = run(config, vault, {"VAULT_TOKEN": ""}, "migrate", "--category", "external")
    assert no_token.returncode == 2
    assert "VAULT_TOKEN: missing" in no_token.stderr

    unknown = run(config, vault, {}, "migrate", "--category", "billing")
    assert unknown.returncode == 2
    assert "--category: 'billing' is not a category of the config" in unknown.stderr

    partial = run(config, vault, env_of(NEW, value="x"), "migrate", "--category", "external")
    assert partial.returncode == 1
    assert f"refused: {variable_name(NEW, 'other')} not set; nothing written" in partial.stdout


def test_diff_and_migrate_with_vault_down_fail_naming_vault_and_write_nothing(
    private_vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    config = broker_config(private_vault, pki, tmp_path)
    env = env_of(NEW, value="from-env", other="from-env-too")
    private_vault.server.pause()
    try:
        results = [
            run(config, private_vault, env, "diff"),
            run(config, private_vault, env, "migrate", "--category", "external"),
        ]
    finally:
        private_vault.server.resume()

    for result in results:
        assert result.returncode == 1
        assert "vault did not answer" in result.stderr
        assert "Traceback" not in result.stderr
        assert "from-env" not in result.stdout + result.stderr
    assert NEW not in private_vault.written
