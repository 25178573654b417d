"""Fixtures that start the real things: an OpenBao server (with its audit device, so tests can
count the reads Vault saw), real certificates, and a real broker on port 0. The helpers they
use are in tests/support.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from broker.config_loader import parse_config
from devstack.ha import ClusterVault
from devstack.pki import DevCA, issue_loopback_server
from tests.support import (
    CATALOG_ID,
    INTRUDER_ID,
    OPS_ID,
    BrokerFactory,
    Measure,
    Pki,
    RunningBroker,
    Vault,
    VaultServers,
    bootstrapped_cluster,
    broker_settings,
    start_vault,
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA("test CA")
    other_ca = DevCA("another CA")
    now = dt.datetime.now(dt.UTC)
    return Pki(
        authority=ca,
        ca=ca.write_ca(directory / "ca.pem"),
        server=issue_loopback_server(ca, directory),
        catalog=ca.issue_files(directory, "catalog", "catalog", uri=CATALOG_ID),
        ops=ca.issue_files(directory, "ops", "ops", uri=OPS_ID),
        intruder=ca.issue_files(directory, "intruder", "intruder", uri=INTRUDER_ID),
        cn_only=ca.issue_files(directory, "cn-only", "ops-tool"),
        foreign=other_ca.issue_files(directory, "foreign", "catalog", uri=CATALOG_ID),
        expired=ca.issue_files(
            directory,
            "expired",
            "catalog",
            uri=CATALOG_ID,
            not_before=now - dt.timedelta(days=2),
            not_after=now - dt.timedelta(days=1),
        ),
    )


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """One OpenBao for the session. Tests that pause or kill Vault use ``private_vault``."""
    started = start_vault(tmp_path_factory.mktemp("openbao"))
    yield started
    started.server.stop()


@pytest.fixture
def private_vault(tmp_path: Path) -> Iterator[Vault]:
    started = start_vault(tmp_path / "openbao")
    yield started
    started.server.stop()


@pytest.fixture
def cluster_vault(tmp_path: Path) -> Iterator[ClusterVault]:
    started = bootstrapped_cluster(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def start_broker(pki: Pki, tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start brokers against a given Vault; every one is stopped after the test."""
    running: list[RunningBroker] = []

    def start(
        vault: VaultServers, environ: Mapping[str, str] | None = None, **settings: Any
    ) -> RunningBroker:
        environ = environ or {}
        document = broker_settings(vault, pki, **settings)
        config = parse_config(document, tmp_path, environ=environ)
        handle = RunningBroker(config, environ)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.stop()


_MEASUREMENTS: dict[str, list[float]] = {}


@pytest.fixture
def measure() -> Measure:
    """Record a timing the test observed; reported at the end of the run, never asserted
    (shared machines are noisy; bench/ measures performance)."""

    def record(name: str, value: float) -> None:
        _MEASUREMENTS.setdefault(name, []).append(value)

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _MEASUREMENTS:
        terminalreporter.section("measured by tests (reported, never asserted)")
        for name, values in sorted(_MEASUREMENTS.items()):
            terminalreporter.write_line(f"{name}: {', '.join(f'{v:.1f}' for v in values)}")
