"""The broker logs in to a real OpenBao with the jwt auth method: a Kubernetes-shaped service
account token, signed by a key made here, bound by audience, subject and claims. The token file
is read again at every login (projected tokens rotate); refusals say what was wrong with the
token and never show it. The kubernetes method is checked as far as it can be without a cluster."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.config import JwtAuth
from broker.config_loader import parse_config
from broker.errors import ConfigError
from devstack.harness import wait_until
from devstack.pki import write_private
from tests.support import API, BrokerFactory, Pki, Vault, broker_settings, get, metric, status_of

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "secretbroker"
SUBJECT = "system:serviceaccount:media:secretbroker"
ROLE = "secretbroker"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwt_vault(private_vault: Vault, signing_key: rsa.RSAPrivateKey) -> Vault:
    """OpenBao with the jwt auth method trusting ``signing_key``, and a role bound like a
    Kubernetes service account's, granting the broker's policy."""
    admin = private_vault.admin
    admin.sys.enable_auth_method("jwt", path="jwt")
    public_pem = (
        signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    admin.auth.jwt.configure(jwt_validation_pubkeys=[public_pem], bound_issuer=ISSUER, path="jwt")
    admin.auth.jwt.create_role(
        name=ROLE,
        role_type="jwt",
        user_claim="sub",
        bound_audiences=[AUDIENCE],
        bound_subject=SUBJECT,
        bound_claims={"/kubernetes.io/namespace": "media"},
        token_policies=["secretbroker"],
        token_no_default_policy=True,
        token_ttl="1h",
        path="jwt",
        allowed_redirect_uris=[],
    )
    return private_vault


def service_account_token(key: rsa.RSAPrivateKey, **changes: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": [AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": "media", "serviceaccount": {"name": "secretbroker"}},
        **changes,
    }
    return jwt.encode(claims, key, algorithm="RS256")


def jwt_auth(token_file: Path) -> dict[str, str]:
    return {"method": "jwt", "role": ROLE, "token_file": str(token_file)}


def test_the_broker_logs_in_with_a_service_account_token_and_rereads_it_at_every_login(
    jwt_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    signing_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    write_private(token_file, service_account_token(signing_key).encode())
    broker = start_broker(jwt_vault, auth=jwt_auth(token_file), secrets_={API: {"ttl": 0}})
    stub = broker.stub(pki.catalog, pki.ca)
    assert get(stub, API).name == API

    # The projected token is rotated in place; the next login (the old token revoked) uses it.
    write_private(token_file, service_account_token(signing_key, jti="second").encode())
    offset = jwt_vault.audit_offset()
    jwt_vault.admin.auth.token.revoke(broker.broker.vault.session.token())

    assert not get(stub, API).stale  # read with a new token, from the new token file
    logins = [
        entry
        for entry in jwt_vault._audit_entries(offset)
        if entry.get("type") == "response" and entry["request"].get("path") == "auth/jwt/login"
    ]
    assert len(logins) == 1
    assert not logins[0].get("error")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("other key", "the token's signature does not verify"),
        ("other audience", "the token's audience is not one the role accepts"),
        ("other subject", "the token's subject is not the role's bound subject"),
        ("other namespace", "a claim of the token does not match the role's bound claims"),
    ],
)
def test_a_refused_token_is_named_in_the_log_without_being_shown(
    jwt_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    signing_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    token: str,
    reason: str,
) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = {
        "other key": lambda: service_account_token(other_key),
        "other audience": lambda: service_account_token(signing_key, aud=["someone-else"]),
        "other subject": lambda: service_account_token(
            signing_key, sub="system:serviceaccount:media:intruder"
        ),
        "other namespace": lambda: service_account_token(
            signing_key, **{"kubernetes.io": {"namespace": "billing"}}
        ),
    }[token]()
    token_file = tmp_path / "token"
    write_private(token_file, forged.encode())
    caplog.set_level(logging.WARNING)
    broker = start_broker(
        jwt_vault,
        auth=jwt_auth(token_file),
        secrets_={API: {}},
        server={"warmup_timeout": "0s"},  # answer at once, not warm: what a caller then sees
    )

    assert status_of(lambda: get(broker.stub(pki.catalog, pki.ca), API)) in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    )
    wait_until(lambda: "vault refused the jwt login" in caplog.text)
    refusals = [
        r.getMessage() for r in caplog.records if "vault refused the jwt login" in r.getMessage()
    ]
    assert any(reason in message for message in refusals), refusals
    assert forged not in caplog.text
    assert (
        metric(broker, "secretbroker_vault_requests_total", operation="login", outcome="denied")
        >= 1
    )


def test_kubernetes_auth_reads_the_service_account_token_and_is_refused_without_a_cluster(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    """Without a cluster, OpenBao cannot review the token: the config and the login request are
    what can be checked here (see the README for what a cluster adds)."""
    token_file = tmp_path / "sa-token"
    write_private(token_file, b"header.payload.signature")
    document = broker_settings(
        vault, pki, auth={"method": "kubernetes", "role": ROLE, "token_file": str(token_file)}
    )
    config = parse_config(document, tmp_path, environ={})
    assert config.vault.auth == JwtAuth("kubernetes", ROLE, token_file, "kubernetes")

    default = broker_settings(vault, pki, auth={"method": "kubernetes", "role": ROLE})
    with pytest.raises(ConfigError) as caught:
        parse_config(default, tmp_path, environ={})
    assert caught.value.key == "vault.auth.token_file"
    assert "/var/run/secrets/kubernetes.io/serviceaccount/token" in caught.value.problem
