"""The broker's server certificate rotates without a restart: new files are checked and used
for the next handshake, connections already open go on, and a broken set is refused while the
current one keeps serving. Real certificates, a real broker, real handshakes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from devstack.pki import CertFiles, DevCA, issue_loopback_server
from secretbroker.client import BrokerClientConfig, SecretsClient, SecretUnavailable
from tests.support import (
    API,
    CATALOG_ID,
    BrokerFactory,
    Measure,
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


SOAK_SECONDS = 180.0
LIFETIME = dt.timedelta(seconds=60)
REISSUE_EVERY = 20.0


@pytest.mark.timeout(SOAK_SECONDS + 120)
@pytest.mark.soak
def test_certificates_valid_60s_reissued_every_20s_for_3_minutes_lose_no_read(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, tmp_path: Path, measure: Measure
) -> None:
    """Under continuous load (a long-lived client, and a new client with a new handshake every
    half second), server and client certificates that live 60 s are re-issued every 20 s
    for 3 minutes: not one read fails."""

    def issue(stem: str, **options: Any) -> CertFiles:
        until = dt.datetime.now(dt.UTC) + LIFETIME
        return pki.authority.issue_files(
            tmp_path / "issued", stem, stem, not_after=until, **options
        )

    def server_pair() -> CertFiles:
        return issue("broker", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True)

    def client_pair() -> CertFiles:
        return issue("catalog", uri=CATALOG_ID)

    server, client = tmp_path / "server", tmp_path / "client"
    server_files = CertFiles(server / "broker.pem", server / "broker-key.pem")
    client_files = CertFiles(client / "catalog.pem", client / "catalog-key.pem")
    for target, source in ((server_files, server_pair()), (client_files, client_pair())):
        target.cert.parent.mkdir(exist_ok=True)
        replace(target, source)
    broker = start_broker(vault, server_files=server_files)
    config = BrokerClientConfig(
        target=f"127.0.0.1:{broker.port}",
        ca_file=pki.ca,
        cert_file=client_files.cert,
        key_file=client_files.key,
        reload_interval=1.0,
    )
    failures: list[str] = []
    reads = {"long-lived": 0, "new handshake": 0}
    stop = threading.Event()

    def read_with(client: SecretsClient, kind: str) -> None:
        try:
            client.get_secret(API)
            reads[kind] += 1
        except SecretUnavailable as exc:
            failures.append(exc.code.name)

    def long_lived() -> None:
        with SecretsClient(config) as client:
            while not stop.is_set():
                read_with(client, "long-lived")
                stop.wait(0.05)

    def new_handshakes() -> None:
        while not stop.is_set():
            with SecretsClient(dataclasses.replace(config, reload_interval=0)) as client:
                read_with(client, "new handshake")
            stop.wait(0.5)

    loaders = [threading.Thread(target=work) for work in (long_lived, new_handshakes)]
    for loader in loaders:
        loader.start()
    deadline = time.monotonic() + SOAK_SECONDS
    renewals = 0
    try:
        while time.monotonic() < deadline:
            time.sleep(REISSUE_EVERY)
            replace(server_files, server_pair())
            replace(client_files, client_pair())
            renewals += 1
    finally:
        stop.set()
        for loader in loaders:
            loader.join(timeout=30)

    measure("reads during the 3-minute certificate soak", sum(reads.values()))
    assert failures == []
    assert renewals >= 8
    assert all(count > renewals for count in reads.values()), reads  # load all along
    assert metric(broker, "secretbroker_tls_reloads_total", result="loaded") >= renewals - 1
