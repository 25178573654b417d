"""Who a caller is, by the X.509-SVID rule, over real mutual TLS against a real broker: exactly one
URI SAN, a valid SPIFFE ID in a trusted domain. Certificates that spell an identity any other way
(a CN, a second URI SAN, a foreign domain) are refused and audited with the reason."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import grpc
import pytest

from broker.config_loader import parse_config
from broker.errors import ConfigError
from broker.security.identity import IdentityResolver
from devstack.pki import CertFiles
from secretbroker.v1 import broker_pb2
from tests.support import (
    API,
    CATALOG_ID,
    DATABASE,
    OPS_ID,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    broker_settings,
    get,
    metric,
    samples,
    status_of,
)


def issue(pki: Pki, tmp_path: Path, common_name: str, *uris: str) -> CertFiles:
    """A certificate from the trusted CA, as a careless CA might issue it."""
    if not uris:
        return pki.authority.issue_files(tmp_path, "odd", common_name)
    return pki.authority.issue_files(tmp_path, "odd", common_name, uri=uris[0], uris=uris[1:])


def admin_status(broker: RunningBroker, client: CertFiles, pki: Pki) -> grpc.StatusCode:
    admin = broker.admin(client, pki.ca)
    return status_of(
        lambda: admin.GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10)
    )


def denials(broker: RunningBroker) -> list[dict[str, object]]:
    lines = broker.audit_lines()
    return [r for r in map(json.loads, lines) if r.get("decision") == "deny"]


@pytest.mark.parametrize(
    ("common_name", "uris", "reason"),
    [
        (OPS_ID, (), "no URI SAN"),  # a CN that spells the admin's SPIFFE ID
        ("ops", (OPS_ID, CATALOG_ID), "2 URI SANs"),
        ("ops", (CATALOG_ID, OPS_ID), "2 URI SANs"),
        ("ops", ("spiffe://evil.example/ops",), "trust domain 'evil.example'"),
        ("ops", ("https://media.local/ops",), "not a valid SPIFFE ID"),
        ("ops", ("spiffe://media.local/../ops",), "not a valid SPIFFE ID"),
    ],
)
def test_a_certificate_that_is_not_one_valid_svid_is_refused_and_audited(
    vault: Vault,
    pki: Pki,
    tmp_path: Path,
    start_broker: BrokerFactory,
    common_name: str,
    uris: tuple[str, ...],
    reason: str,
) -> None:
    broker = start_broker(vault, access={CATALOG_ID: ["media-catalog/*"], OPS_ID: [API]})
    odd = issue(pki, tmp_path, common_name, *uris)

    assert admin_status(broker, odd, pki) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: get(broker.stub(odd, pki.ca), API)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    records = denials(broker)
    assert len(records) == 2
    assert all(r["identity"] is None and reason in str(r["reason"]) for r in records)
    real_ops = broker.admin(pki.ops, pki.ca)  # the real ops still is an admin
    assert real_ops.GetRollbackState(broker_pb2.GetRollbackStateRequest(), timeout=10).state


def test_the_cn_fallback_is_off_by_default_and_cn_identities_have_their_own_namespace(
    vault: Vault, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    off = start_broker(vault)
    assert status_of(lambda: get(off.stub(pki.cn_only, pki.ca), API)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )

    on = start_broker(
        vault,
        identity={"cn_fallback": True},
        access={CATALOG_ID: ["media-catalog/*"], "cn:ops-tool": [API]},
    )
    stub = on.stub(pki.cn_only, pki.ca)
    assert get(stub, API).name == API
    assert status_of(lambda: get(stub, DATABASE)) == grpc.StatusCode.PERMISSION_DENIED
    spoof = issue(pki, tmp_path, OPS_ID)  # with the fallback on: "cn:spiffe://...", no admin
    assert admin_status(on, spoof, pki) == grpc.StatusCode.PERMISSION_DENIED
    assert [r["identity"] for r in denials(on)][-1] == f"cn:{OPS_ID}"


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"access": {"ops-tool": [API]}}, "access.ops-tool", "neither a SPIFFE ID"),
        ({"access": {"cn:ops-tool": [API]}}, "access.cn:ops-tool", "cn_fallback is off"),
        (
            {"identity": {"trust_domains": ["other.example"]}},
            f"access.{CATALOG_ID}",
            "not in identity.trust_domains",
        ),
        ({"admin": {"identities": ["ops"]}}, "admin.identities", "neither a SPIFFE ID"),
        ({"identity": {"trust_domains": ["Not A Domain"]}}, "identity.trust_domains", "domain"),
    ],
)
def test_identities_in_the_config_must_be_ones_a_certificate_can_have(
    vault: Vault, pki: Pki, tmp_path: Path, settings: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(broker_settings(vault, pki, **settings), tmp_path, environ={})  # type: ignore[arg-type]

    assert caught.value.key == key
    assert problem in caught.value.problem


def test_the_first_expiring_client_certificate_in_use_per_named_identity_is_in_the_metrics(
    vault: Vault, pki: Pki, tmp_path: Path, start_broker: BrokerFactory
) -> None:
    """Two catalog pods, one whose renewal is late: the metric shows the certificate that expires
    first. A certificate no longer presented drops out; an identity the config does not name
    gets no series, since a certificate is client input."""
    broker = start_broker(vault)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    late_pod = pki.authority.issue_files(
        tmp_path, "late", "catalog", uri=CATALOG_ID, not_after=soon
    )
    stranger = issue(pki, tmp_path, "stranger", "spiffe://media.local/stranger")
    assert get(broker.stub(pki.catalog, pki.ca), API).name == API
    assert get(broker.stub(late_pod, pki.ca), API).name == API
    assert status_of(lambda: get(broker.stub(stranger, pki.ca), API)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )

    name = "secretbroker_client_certificate_expiry_timestamp_seconds"
    assert metric(broker, name, identity=CATALOG_ID) == int(soon.timestamp())
    assert not [
        labels
        for (n, labels) in samples(broker)
        if n == name and ("identity", "spiffe://media.local/stranger") in labels
    ]
    assert (
        metric(
            broker,
            "secretbroker_client_certificate_not_before_timestamp_seconds",
            identity=CATALOG_ID,
        )
        < time.time()
    )


def test_a_certificate_counts_as_in_use_until_it_has_not_been_presented_for_the_window(
    pki: Pki,
) -> None:
    now = [1000.0]
    resolver = IdentityResolver(["media.local"], clock=lambda: now[0])
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    old_pem, _ = pki.authority.issue("catalog", uri=CATALOG_ID, not_after=soon)
    new_pem, _ = pki.authority.issue("catalog", uri=CATALOG_ID)
    for pem in (old_pem, new_pem):
        assert resolver.identity({"x509_pem_cert": [pem]}) == CATALOG_ID

    assert resolver.certificates_in_use(600)[CATALOG_ID].not_after == int(soon.timestamp())
    now[0] += 400
    resolver.identity({"x509_pem_cert": [new_pem]})  # the pod renewed: only the new one is used
    now[0] += 400
    assert resolver.certificates_in_use(600)[CATALOG_ID].not_after > soon.timestamp() + 3600
    now[0] += 700
    assert resolver.certificates_in_use(600) == {}
