"""Config loading: every error names its key; relative paths resolve from the file's folder."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.config import AppRoleAuth, TokenAuth
from broker.config_loader import load_config, parse_config
from broker.errors import ConfigError
from broker.tools.vault_policy import vault_policy
from devstack.harness import broker_command
from tests.support import DEPLOY, example_config


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("server.pem", "server-key.pem", "ca.pem", "role_id", "secret_id"):
        (tmp_path / name).write_text("x")
    return tmp_path


def settings() -> dict[str, Any]:
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "cert_file": "server.pem",
            "key_file": "server-key.pem",
            "client_ca_file": "ca.pem",
        },
        "vault": {
            "address": "http://127.0.0.1:8200",
            "auth": {"method": "approle", "role_id_file": "role_id", "secret_id_file": "secret_id"},
        },
        "secrets": {
            "media-catalog/database": {"keys": ["url"]},
            "media-catalog/api": {"ttl": "1m", "path": "mc/jwt", "keys": ["jwt_secret"]},
        },
        "access": {"spiffe://media.local/catalog": ["media-catalog/*"]},
    }


def test_defaults_and_relative_paths(files: Path) -> None:
    config = parse_config(settings(), files, environ={})

    assert config.server.cert_file == files / "server.pem"
    assert isinstance(config.vault.auth, AppRoleAuth)
    assert config.vault.auth.secret_id_file == files / "secret_id"
    database = config.secrets["media-catalog/database"]
    assert (database.path, database.category, database.ttl) == (
        "media-catalog/database",
        "database",
        300.0,
    )
    api = config.secrets["media-catalog/api"]
    assert (api.path, api.category, api.ttl) == ("mc/jwt", "jwt", 60.0)
    # The documented defaults of the new tables (deploy/broker.example.toml, README).
    limits = config.limits
    assert (
        limits.max_watch_streams_per_identity,
        limits.max_watch_names,
        limits.max_pending_calls,
    ) == (5000, 100, 20_000)
    assert config.server.min_client_ping_interval == 10.0
    assert config.identity.trust_domains == {"media.local"}  # from the IDs [access] names
    assert config.identity.cn_fallback is False


def test_vault_addr_overrides_the_file(files: Path) -> None:
    config = parse_config(settings(), files, environ={"VAULT_ADDR": "https://vault.internal:8200"})
    assert config.vault.address == "https://vault.internal:8200"


def test_token_auth_takes_vault_token_and_never_shows_it(files: Path) -> None:
    data = settings()
    data["vault"]["auth"] = {"method": "token"}
    config = parse_config(data, files, environ={"VAULT_TOKEN": "s.tok-do-not-print"})

    assert isinstance(config.vault.auth, TokenAuth)
    assert config.vault.auth.env_token is not None
    assert config.vault.auth.env_token.reveal() == "s.tok-do-not-print"
    assert "tok-do-not-print" not in repr(config)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("key", "value", "expected_key"),
    [
        ("server.listen", "no-port", "server.listen"),
        ("server.cert_file", _DELETE, "server.cert_file"),
        ("server.key_file", "missing.pem", "server.key_file"),
        ("server.colour", "blue", "server.colour"),
        ("vault.address", "vault:8200", "vault.address"),
        ("vault.addresses", ["https://a:8200"], "vault.addresses"),  # beside vault.address
        ("vault.addresses", "https://a:8200", "vault.addresses"),
        ("vault.timeout", "soon", "vault.timeout"),
        ("vault.timeout", 0, "vault.timeout"),
        ("vault.auth.method", "ldap", "vault.auth.method"),
        ("vault.auth.secret_id_file", "nope", "vault.auth.secret_id_file"),
        ("secrets", {}, "secrets"),
        ("secrets./abs", {}, "secrets./abs"),
        (
            "secrets.media-catalog/database",
            {"keys": ["url"], "ttl": -1},
            "secrets.media-catalog/database.ttl",
        ),
        ("secrets.media-catalog/database", {}, "secrets.media-catalog/database.keys"),
        (
            "secrets.media-catalog/database",
            {"keys": []},
            "secrets.media-catalog/database.keys",
        ),
        (
            "secrets.media-catalog/database",
            {"keys": ["url"], "rotation": {"key": "password"}},
            "secrets.media-catalog/database.rotation.key",
        ),
        (
            "secrets.media-catalog/database",
            {"keys": ["url"], "rotation": {"key": "url", "bytes": 4}},
            "secrets.media-catalog/database.rotation.bytes",
        ),
        (
            "secrets.media-catalog/database",
            {"keys": ["url"], "rotation": {"key": "url", "period": 0}},
            "secrets.media-catalog/database.rotation.period",
        ),
        ("admin", {"identities": "ops"}, "admin.identities"),
        ("rollout", {"watch_poll_interval": 0}, "rollout.watch_poll_interval"),
        ("rollout", {"previous_versions": -1}, "rollout.previous_versions"),
        ("audit", {"fail_closed": "yes"}, "audit.fail_closed"),
        ("access.spiffe://x", "media-catalog/*", "access.spiffe://x"),
        ("cache", {"max_stal": 5}, "cache.max_stal"),
        ("log", {"level": "LOUD"}, "log.level"),
    ],
)
def test_invalid_config_names_the_key(files: Path, key: str, value: Any, expected_key: str) -> None:
    data = settings()
    if key.startswith(("secrets.", "access.")) and key.count(".") == 1:
        table, name = key.split(".", 1)
        data[table][name] = value
    else:
        _set(data, key, value)

    with pytest.raises(ConfigError) as caught:
        parse_config(data, files, environ={})

    assert caught.value.key == expected_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("[]", frozenset()),
        ('["database"]', frozenset({"database"})),
        ('["database", "jwt"]', frozenset({"database", "jwt"})),
    ],
)
def test_vault_enabled_secrets_forms(
    files: Path, raw: str | None, expected: frozenset[str] | None
) -> None:
    environ = {} if raw is None else {"VAULT_ENABLED_SECRETS": raw}
    config = parse_config(settings(), files, environ=environ)
    assert config.startup_rollback.vault_categories == expected
    assert config.startup_rollback.raw == raw


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("database", "must be a JSON list"),
        ('{"database": true}', "must be a JSON list"),
        ("[1]", "must be a JSON list"),
        ('["databse"]', "unknown category 'databse'; declared: database, jwt"),
    ],
)
def test_malformed_vault_enabled_secrets_stops_start_up(
    files: Path, raw: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(settings(), files, environ={"VAULT_ENABLED_SECRETS": raw})
    assert caught.value.key == "VAULT_ENABLED_SECRETS"
    assert problem in caught.value.problem


def test_token_auth_without_token_names_the_key(files: Path) -> None:
    data = settings()
    data["vault"]["auth"] = {"method": "token"}
    with pytest.raises(ConfigError, match=r"^vault\.auth\.token_file: missing, and VAULT_TOKEN"):
        parse_config(data, files, environ={})


def test_load_config_rejects_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_example_config_in_deploy_is_valid(tmp_path: Path) -> None:
    """deploy/broker.example.toml documents every key; copied beside its files, it loads."""
    config = load_config(example_config(tmp_path), environ={})

    assert config.server.cert_file == tmp_path / "certs/broker.pem"
    assert config.audit.key is not None
    assert config.audit.file_mode == 0o600
    assert set(config.secrets) == {
        "media-catalog/database",
        "media-catalog/api",
        "media-catalog/external",
    }


def test_serve_with_invalid_config_exits_naming_the_key(files: Path) -> None:
    path = files / "broker.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:0"\n')
    result = broker_command("serve", "--config", str(path), timeout=60)
    assert result.returncode == 2
    assert "config error: server.cert_file: missing" in result.stderr


def test_the_deploy_vault_policy_is_the_one_derived_from_the_example_config(
    tmp_path: Path,
) -> None:
    """deploy/vault/policies/secretbroker-prod.hcl is what `python -m broker vault-policy` prints
    for the example config: the policy follows [secrets] instead of being kept equal by hand."""
    result = broker_command("vault-policy", "--config", str(example_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    printed = result.stdout

    assert printed == (DEPLOY / "vault" / "policies" / "secretbroker-prod.hcl").read_text()


def test_vault_addresses_name_every_node_and_vault_addr_overrides_them(tmp_path: Path) -> None:
    path = example_config(tmp_path)
    document = tomllib.loads(path.read_text())
    del document["vault"]["address"]
    nodes = ["https://bao-0:8200", "https://bao-1:8200/", "https://bao-2:8200"]
    document["vault"]["addresses"] = nodes

    config = parse_config(document, tmp_path, environ={})
    assert config.vault.addresses == (
        "https://bao-0:8200",
        "https://bao-1:8200",
        "https://bao-2:8200",
    )

    overridden = parse_config(document, tmp_path, environ={"VAULT_ADDR": "http://x:1"})
    assert overridden.vault.addresses == ("http://x:1",)

    document["vault"]["addresses"] = ["https://bao-0:8200", "bao-1:8200"]
    with pytest.raises(ConfigError, match=r"vault\.addresses: must start with http"):
        parse_config(document, tmp_path, environ={})


def test_the_resilience_settings_default_as_documented_and_a_wrong_one_names_its_key(
    files: Path,
) -> None:
    config = parse_config(settings(), files, environ={})
    assert (
        config.vault.call_budget,
        config.cache.revalidate_wait,
        config.server.warmup_timeout,
        config.audit.queue_size,
        config.audit.write_timeout,
    ) == (3.0, 0.05, 30.0, 10_000, 0.5)
    for table, key, value in [
        ("vault", "call_budget", "0s"),
        ("cache", "revalidate_wait", "soon"),
        ("server", "warmup_timeout", "-1s"),
        ("audit", "queue_size", 0),
        ("audit", "write_timeout", "0s"),
    ]:
        data = settings()
        data.setdefault(table, {})[key] = value
        with pytest.raises(ConfigError) as caught:
            parse_config(data, files, environ={})
        assert caught.value.key == f"{table}.{key}"


@pytest.mark.parametrize(
    ("entry", "expected_key", "problem"),
    [
        ({"keys": ["url"], "database": {}}, "secrets.media-catalog/database.database.role", ""),
        (
            {"keys": ["url"], "database": {"role": "catalog"}},
            "secrets.media-catalog/database.database.url",
            "is needed to serve the key url",
        ),
        (
            {"keys": ["url"], "database": {"role": "catalog", "url": "postgresql://db/x"}},
            "secrets.media-catalog/database.database.url",
            "must hold {username} and {password}",
        ),
        (
            {"keys": ["dsn"], "database": {"role": "catalog"}},
            "secrets.media-catalog/database.keys",
            "serves only username, password, url, expires_at; not dsn",
        ),
        (
            {"keys": ["username"], "database": {"role": "catalog", "handover": 0}},
            "secrets.media-catalog/database.database.handover",
            "",
        ),
        (
            {"keys": ["username"], "database": {"role": "catalog", "rol": "x"}},
            "secrets.media-catalog/database.database.rol",
            "",
        ),
        (
            {
                "keys": ["password"],
                "database": {"role": "catalog"},
                "rotation": {"key": "password"},
            },
            "secrets.media-catalog/database.rotation",
            "rotated by its lease",
        ),
    ],
)
def test_a_bad_database_secret_names_its_key(
    files: Path, entry: dict[str, Any], expected_key: str, problem: str
) -> None:
    data = settings()
    data["secrets"]["media-catalog/database"] = entry
    with pytest.raises(ConfigError) as caught:
        parse_config(data, files, environ={})
    assert caught.value.key == expected_key
    assert problem in caught.value.problem


def test_a_database_secret_is_read_with_its_defaults(files: Path) -> None:
    data = settings()
    template = "postgresql://{username}:{password}@db:5432/catalog"
    data["secrets"]["media-catalog/database"] = {
        "keys": ["url", "expires_at"],
        "database": {"role": "catalog", "url": template},
    }
    database = parse_config(data, files, environ={}).secrets["media-catalog/database"].database
    assert database is not None
    assert (database.role, database.mount, database.url, database.handover) == (
        "catalog",
        "database",
        template,
        60.0,
    )


@pytest.mark.parametrize(
    ("static", "paths"),
    [
        (
            False,
            {
                'path "database/creds/catalog"': '["read"]',
                'path "sys/leases/renew/database/creds/catalog/*"': '["update"]',
                'path "sys/leases/revoke/database/creds/catalog/*"': '["update"]',
            },
        ),
        (True, {'path "database/static-creds/catalog"': '["read"]'}),
    ],
)
def test_the_derived_policy_grants_a_database_secret_its_role_and_its_own_leases_only(
    files: Path, static: bool, paths: dict[str, str]
) -> None:
    data = settings()
    data["secrets"]["media-catalog/database"] = {
        "keys": ["username"],
        "database": {"role": "catalog", "static": static},
    }
    policy = vault_policy(parse_config(data, files, environ={}))
    blocks = dict(re.findall(r'(path "[^"]+") \{\s*capabilities = (\[[^\]]*\])', policy))
    database_blocks = {p: c for p, c in blocks.items() if "database" in p or "leases" in p}
    assert database_blocks == paths
    assert "media-catalog/database" not in "".join(blocks), "no KV path for it"
