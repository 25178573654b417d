"""The broker's server certificate rotates without a restart: new files are checked and used
for the next handshake, connections already open go on, and a broken set is refused while the
current one keeps serving. Real certificates, a real broker, real handshakes."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from devstack.pki import CertFiles, DevCA, issue_loopback_server
from tests.conftest import (
    API,
    CATALOG_ID,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    get,
    metric,
    status_of,
)


def served_serial(broker: RunningBroker, pki: Pki) -> int:
    """The serial of the certificate the broker presents in a new handshake."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.catalog.cert), str(pki.catalog.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(files: CertFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def replace(target: CertFiles, source: CertFiles) -> None:
    """Put ``source`` in place of ``target`` the way issuers do: each file renamed over."""
    for new, old in ((source.key, target.key), (source.cert, target.cert)):
        write_atomically(old, new.read_bytes())


def test_a_renewed_certificate_is_used_for_new_handshakes_and_a_broken_one_is_refused(
    vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = issue_loopback_server(pki.authority, tmp_path / "live")  # files of its own to rotate
    broker = start_broker(vault, server_files=live)
    opened = broker.stub(pki.catalog, pki.ca)
    assert get(opened, API).name == API
    assert served_serial(broker, pki) == serial_of(live)

    renewed = issue_loopback_server(pki.authority, tmp_path / "renewed")
    replace(live, renewed)

    assert served_serial(broker, pki) == serial_of(renewed)
    assert get(opened, API).name == API, "a connection opened before goes on"
    assert get(broker.stub(pki.catalog, pki.ca), API).name == API
    assert metric(broker, "secretbroker_tls_reloads_total", result="loaded") == 1

    caplog.set_level(logging.WARNING)
    other = issue_loopback_server(pki.authority, tmp_path / "other")
    live.key.write_bytes(other.key.read_bytes())  # a key of another certificate

    assert served_serial(broker, pki) == serial_of(renewed), "the current set keeps serving"
    assert metric(broker, "secretbroker_tls_reloads_total", result="rejected") == 1
    assert "server.key_file: does not match the certificate" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    expiry = metric(
        broker, "secretbroker_tls_certificate_expiry_timestamp_seconds", certificate="server"
    )
    assert (
        expiry
        == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).not_valid_after_utc.timestamp()
    )


def test_a_client_ca_rollover_takes_both_then_only_the_new_one(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path
) -> None:
    """The bundle first holds the old and the new CA (clients move over one by one), then only
    the new one: from then on a new connection with an old-CA certificate is refused."""
    new_ca = DevCA("the next client CA")
    moved = new_ca.issue_files(tmp_path / "moved", "catalog", "catalog", uri=CATALOG_ID)
    bundle = tmp_path / "clients-ca.pem"
    bundle.write_bytes(pki.ca.read_bytes())
    broker = start_broker(vault, client_ca=bundle)
    assert status_of(lambda: get(broker.stub(moved, pki.ca), API)) == grpc.StatusCode.UNAVAILABLE

    write_atomically(bundle, pki.ca.read_bytes() + new_ca.cert_pem)
    assert get(broker.stub(moved, pki.ca), API).name == API
    assert get(broker.stub(pki.catalog, pki.ca), API).name == API

    write_atomically(bundle, new_ca.cert_pem)
    assert get(broker.stub(moved, pki.ca), API).name == API
    assert status_of(lambda: get(broker.stub(pki.catalog, pki.ca), API)) == (
        grpc.StatusCode.UNAVAILABLE
    ), "an old-CA certificate gets no new connection"
    assert metric(broker, "secretbroker_tls_reloads_total", result="loaded") == 2


def write_atomically(path: Path, data: bytes) -> None:
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    os.replace(staged, path)
