"""What the tests share besides fixtures: the test PKI and Vault, broker settings, a broker run
in-process (RunningBroker), channels and calls, and scrape readers. The fixtures that start
these are in conftest.py; processes, waits and client configs come from the one harness
(devstack/harness.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import hvac
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import BrokerConfig
from broker.server import Broker
from broker.sources.env import variable_name
from devstack.bootstrap import (
    AppRoleFiles,
    RoleTTLs,
    create_broker_approle,
    ensure_kv2_mount,
    write_policy,
)
from devstack.broker_config import approle_auth, broker_document, write_broker_config
from devstack.ha import CatalogLoad, ClusterVault, start_cluster_vault
from devstack.harness import broker_command, client_config, wait_until
from devstack.openbao import OpenBaoDevServer
from devstack.pki import CertFiles, DevCA, write_private
from devstack.stack import client_env
from secretbroker.client import (
    BrokerClientConfig,
    RetryPolicy,
    SecretsClient,
    channel_credentials,
)
from secretbroker.client import secure_channel as sdk_secure_channel
from secretbroker.v1 import broker_pb2, broker_pb2_grpc

T = TypeVar("T")

CATALOG_ID = "spiffe://media.local/catalog"
INTRUDER_ID = "spiffe://media.local/intruder"
OPS_ID = "spiffe://media.local/ops"
KV_MOUNT = "secret"
DEPLOY = Path(__file__).parents[1] / "deploy"
DEPLOY_POLICY = DEPLOY / "vault" / "policies" / "secretbroker-prod.hcl"
DATABASE = "media-catalog/database"
API = "media-catalog/api"
EXTERNAL = "media-catalog/external"
SECRET_KEYS = ("value", "other")
"""The keys every test secret holds; a test's secret settings may declare others."""


@dataclass(frozen=True)
class Pki:
    authority: DevCA
    """The test CA itself, for tests that issue certificates of their own."""
    ca: Path
    server: CertFiles
    catalog: CertFiles
    ops: CertFiles
    intruder: CertFiles
    cn_only: CertFiles
    foreign: CertFiles
    expired: CertFiles


@dataclass
class Vault:
    """A running OpenBao, bootstrapped with the broker's real policy and AppRole."""

    server: OpenBaoDevServer
    admin: hvac.Client
    approle: AppRoleFiles
    audit_log: Path
    written: dict[str, dict[str, str]] = field(default_factory=dict)

    def __repr__(self) -> str:  # pytest prints fixtures on failure: never the written values
        return f"Vault({self.address}, paths={sorted(self.written)})"

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def addresses(self) -> list[str]:
        return [self.server.address]

    def write(self, path: str, **data: str) -> int:
        """Write a new version; returns its version number."""
        response = self.admin.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point=KV_MOUNT
        )
        self.written[path] = data
        return int(response["data"]["version"])

    def audit_offset(self) -> int:
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def logins_since(self, offset: int) -> int:
        """How many AppRole logins OpenBao's audit log recorded after ``offset``."""
        return sum(
            1
            for entry in self._audit_entries(offset)
            if entry.get("type") == "request"
            and entry["request"].get("path") == "auth/approle/login"
        )

    def live_broker_tokens(self) -> int:
        """How many live tokens in OpenBao came from an AppRole login (the broker's)."""
        accessors = self.admin.adapter.list("/v1/auth/token/accessors")["data"]["keys"]
        return sum(
            1
            for accessor in accessors
            if self.admin.auth.token.lookup_accessor(accessor)["data"]["path"]
            == "auth/approle/login"
        )

    def _audit_entries(self, offset: int) -> list[dict[str, Any]]:
        with self.audit_log.open("rb") as file:
            file.seek(offset)
            return [json.loads(line) for line in file if line.strip()]

    def reads_since(self, offset: int, path: str, *, refused: bool = False) -> int:
        """How many KV reads of ``path`` OpenBao's own audit log recorded after ``offset``;
        with ``refused``, only those OpenBao answered with an error (e.g. an expired token)."""
        if refused:
            return self._kv_calls(offset, path, ("read",), "response", failed=True)
        return self._kv_calls(offset, path, ("read",), "request")

    def writes_since(self, offset: int, path: str, *, answered: bool | None = None) -> int:
        """KV writes of ``path`` OpenBao took in after ``offset``; with ``answered``, those it
        answered without an error (True) or with one (False)."""
        operations = ("create", "update")
        if answered is None:
            return self._kv_calls(offset, path, operations, "request")
        return self._kv_calls(offset, path, operations, "response", failed=not answered)

    def _kv_calls(
        self, offset: int, path: str, operations: tuple[str, ...], kind: str, failed: bool = False
    ) -> int:
        return sum(
            1
            for entry in self._audit_entries(offset)
            if entry.get("type") == kind
            and entry["request"].get("operation") in operations
            and entry["request"].get("path") == f"{KV_MOUNT}/data/{path}"
            and (kind == "request" or bool(entry.get("error")) == failed)
        )


AUDIT_DEVICE_HCL = """
audit "file" "requests" {{
  options {{
    file_path = "{path}"
  }}
}}
"""


async def until(check: Callable[[], bool], what: str) -> None:
    """The harness's wait_until, in a worker thread: the loop keeps running meanwhile."""
    await asyncio.to_thread(wait_until, check, 20, what)


def start_vault(workdir: Path, ttls: RoleTTLs | None = None) -> Vault:
    audit_log = workdir / "audit.log"
    server = OpenBaoDevServer(
        workdir,
        root_token=secrets.token_hex(16),
        extra_config_hcl=AUDIT_DEVICE_HCL.format(path=audit_log),
    )
    server.start()
    admin = hvac.Client(url=server.address, token=server.root_token, timeout=5)
    ensure_kv2_mount(admin, KV_MOUNT)
    # The deploy kit's policy, as an operator would load it (it is derived from the example
    # config: tests/test_config.py keeps the two equal).
    approle = create_broker_approle(
        admin,
        write_policy(admin, DEPLOY_POLICY.read_text()),
        workdir / "approle",
        ttls or RoleTTLs(),
    )
    vault = Vault(server, admin, approle, audit_log)
    for path in (DATABASE, API, EXTERNAL):
        vault.write(path, value=secrets.token_urlsafe(24), other=secrets.token_urlsafe(8))
    return vault


def bootstrapped_cluster(tmp_path: Path, ttls: RoleTTLs | None = None) -> ClusterVault:
    """A 3-node OpenBao raft cluster with the deploy policy, the AppRole and both secrets."""
    return start_cluster_vault(
        tmp_path,
        DEPLOY_POLICY.read_text(),
        {path: {key: secrets.token_urlsafe(16) for key in SECRET_KEYS} for path in (DATABASE, API)},
        KV_MOUNT,
        ttls,
    )


DEFAULT_SECRETS: Mapping[str, Mapping[str, Any]] = {DATABASE: {}, API: {}}


class VaultServers(Protocol):
    """One OpenBao server (Vault) or a raft cluster (tests/ha.py): where, and the AppRole."""

    @property
    def addresses(self) -> list[str]: ...

    @property
    def approle(self) -> AppRoleFiles: ...


def broker_settings(
    vault: VaultServers,
    pki: Pki,
    *,
    secrets_: Mapping[str, Mapping[str, Any]] | None = None,
    access: Mapping[str, list[str]] | None = None,
    cache: Mapping[str, Any] | None = None,
    timeout: str = "1s",
    listen: str = "127.0.0.1:0",
    log_level: str = "DEBUG",
    auth: Mapping[str, str] | None = None,
    admin: Mapping[str, Any] | None = None,
    rollout: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    server_files: CertFiles | None = None,
    client_ca: Path | None = None,
    server: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The broker's TOML document as a dict: what a user would write. Admin is OPS_ID.
    ``server``: [server] keys besides the listener and its files."""
    document = broker_document(
        listen=listen,
        server=server_files or pki.server,
        client_ca=client_ca or pki.ca,
        vault_address=vault.addresses[0] if len(vault.addresses) == 1 else vault.addresses,
        auth=auth or approle_auth(vault.approle.role_id_file, vault.approle.secret_id_file),
        secrets={
            name: {"keys": list(SECRET_KEYS), **spec}
            for name, spec in (
                secrets_ if secrets_ is not None else {DATABASE: {}, API: {}}
            ).items()
        },
        access=access if access is not None else {CATALOG_ID: ["media-catalog/*"]},
        vault={"timeout": timeout},
        identity=identity or {},
        limits=limits or {},
        admin=admin if admin is not None else {"identities": [OPS_ID]},
        rollout=rollout or {},
        audit=audit or {"file": "audit.jsonl"},
        metrics=metrics or {"listen": "127.0.0.1:0", "vault_probe_interval": "1s"},
        cache=cache or {},
        log={"level": log_level},
    )
    document["server"].update(server or {})
    return document


def example_config(folder: Path) -> Path:
    """deploy/broker.example.toml copied into ``folder`` beside stand-ins for the files it names
    (an audit key of the right length and mode among them)."""
    for name in (
        "certs/broker.pem",
        "certs/broker-key.pem",
        "certs/clients-ca.pem",
        "approle/role_id",
        "approle/secret_id",
    ):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("x")
    (folder / "secrets").mkdir(exist_ok=True)
    write_private(folder / "secrets/audit.key", secrets.token_hex(32).encode())
    (folder / "broker.toml").write_text((DEPLOY / "broker.example.toml").read_text())
    return folder / "broker.toml"


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` (from broker_settings) as the TOML file a user would hand to serve."""
    return write_broker_config(path, settings)


class Listening(Protocol):
    """A broker in this process or its own (RunningBroker, BrokerProcess)."""

    @property
    def port(self) -> int: ...


def ops_cli(brokers: Sequence[Listening], pki: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` as ops (SECRETBROKER_* env) against every broker in ``brokers``."""
    addresses = ",".join(f"127.0.0.1:{broker.port}" for broker in brokers)
    return broker_command(*args, env=client_env(addresses, pki.ca, pki.ops))


def serve(
    config: Path, *, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m broker serve --config CONFIG`` run to its end (for start-ups that fail)."""
    return broker_command("serve", "--config", str(config), env=env, timeout=timeout)


class SkippingClock:
    """The monotonic clock, plus the time a test skipped (``advance``): TTLs and staleness
    expire at once instead of after a real wait, while time still flows for the rest."""

    def __init__(self) -> None:
        self._skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self._skipped

    def advance(self, seconds: float) -> None:
        self._skipped += seconds


class RunningBroker:
    """A real Broker serving on its own event loop in a background thread; its cache runs on
    ``clock`` (a SkippingClock the test can move forward)."""

    def __init__(self, config: BrokerConfig, environ: Mapping[str, str]) -> None:
        self.config = config
        self.clock = SkippingClock()
        self._environ = environ
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="broker-loop", daemon=True
        )
        self._thread.start()
        self.broker: Broker = self.run(self._create())
        self.port = self.run(self.broker.start())
        self._stopped = False

    async def _create(self) -> Broker:
        return Broker(self.config, environ=self._environ, clock=self.clock)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float = 0, delay: float = 0) -> None:
        """Stop the broker; ``delay`` and ``grace`` as in Broker.stop (none by default)."""
        if self._stopped:
            return
        self._stopped = True
        self.run(self.broker.stop(grace=grace, delay=delay))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def stub(self, client: CertFiles | None, ca: Path) -> broker_pb2_grpc.SecretBrokerStub:
        return broker_pb2_grpc.SecretBrokerStub(secure_channel(self.port, ca, client))

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        """GET ``path`` from the broker's metrics listener: status and body."""
        url = f"http://127.0.0.1:{self.broker.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def forget(self, *names: str) -> None:
        """Drop the cached values of ``names``: a secret this broker holds no value for (a
        started broker holds every declared one: it warms up before it takes traffic)."""

        async def forget() -> None:
            for name in names:
                self.broker.cache.invalidate(name)

        self.run(forget())

    def audit_lines(self) -> list[str]:
        """The audit trail's lines, once every record queued so far is written (the trail's
        writer thread writes after the answer)."""
        assert self.broker.config.audit.file is not None
        assert self.broker.audit.flush()
        return self.broker.config.audit.file.read_text().splitlines()

    def admin(self, client: CertFiles, ca: Path) -> broker_pb2_grpc.SecretBrokerAdminStub:
        return broker_pb2_grpc.SecretBrokerAdminStub(secure_channel(self.port, ca, client))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(broker: RunningBroker) -> Samples:
    """Every sample of a scrape of the broker's /metrics, by name and labels."""
    status, text = broker.scrape()
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(broker: RunningBroker, name: str, **labels: str) -> float:
    """One sample of a scrape; a series that is not there fails the test (never reads as 0)."""
    found = samples(broker)
    key = (name, frozenset(labels.items()))
    assert key in found, f"the scrape has no series {name}{labels}"
    return found[key]


def secure_channel(port: int, ca: Path, client: CertFiles | None) -> grpc.Channel:
    """The SDK's channel as ``client``; with None, a channel that presents no certificate."""
    if client is None:
        return grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(ca))
    return sdk_secure_channel(client_config(f"127.0.0.1:{port}", ca, client))


BrokerFactory = Callable[..., RunningBroker]


def client_for(pki: Pki, port: int, retry: RetryPolicy | None = None) -> SecretsClient:
    return SecretsClient(client_config(f"127.0.0.1:{port}", pki.ca, pki.catalog, retry=retry))


def get(
    stub: broker_pb2_grpc.SecretBrokerStub,
    name: str,
    timeout: float = 10,
    version: int | None = None,
) -> broker_pb2.Secret:
    request = broker_pb2.GetSecretRequest(name=name, version=version)
    return stub.GetSecret(request, timeout=timeout).secret


class Watch:
    """An open WatchSecrets stream: ``next()`` is the next secret sent."""

    def __init__(
        self, stub: broker_pb2_grpc.SecretBrokerStub, names: list[str], timeout: float = 60
    ) -> None:
        self._call = stub.WatchSecrets(broker_pb2.WatchSecretsRequest(names=names), timeout=timeout)
        self._responses = iter(self._call)

    def next(self) -> broker_pb2.Secret:
        return next(self._responses).secret

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code a failing call ends with; fails the test if the call succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


Measure = Callable[[str, float], None]
"""Records a timing the test observed (the ``measure`` fixture)."""


# Shared by the rollback tests (one broker, and replicas) --------------------------------------

ENV_VALUES = {
    variable_name(name, key): f"env-{name}-{key}" for name in (DATABASE, API) for key in SECRET_KEYS
}
"""What the brokers' environment serves when a category is rolled back."""


# Shared by the HA tests (a raft cluster, and replicas) -----------------------------------------

HA_ROTATING: dict[str, dict[str, Any]] = {
    DATABASE: {"ttl": 1},
    API: {"ttl": 1, "rotation": {"key": "value", "bytes": 24}},
}
HA_SETTINGS: dict[str, Any] = {
    "secrets_": HA_ROTATING,
    "cache": {"max_stale": "1h"},
    "rollout": {"watch_poll_interval": "500ms"},
}


def replicas_of(
    cluster_vault: ClusterVault, start_broker: BrokerFactory, count: int = 2
) -> list[RunningBroker]:
    return [start_broker(cluster_vault, **HA_SETTINGS) for _ in range(count)]


def load_on(brokers: list[RunningBroker], pki: Pki) -> CatalogLoad:
    endpoints = [f"127.0.0.1:{broker.port}" for broker in brokers]
    config = client_config(endpoints, pki.ca, pki.catalog)
    return CatalogLoad(config, [DATABASE, API]).start()


def assert_no_read_lost(load: CatalogLoad) -> None:
    report = load.stop()
    assert report.reads > 100, "the load ran"
    assert report.failed == [], f"{len(report.failed)} of {report.reads} reads failed"
    assert report.went_back == []
    assert report.live_missing == 0


class RenewedClientFiles:
    """A copy of the catalog's certificate and key that ``renew`` replaces in place, as a
    certificate manager would (key first, by rename), with one from another CA; and the client
    settings that follow them (checked every 0.1 s, retrying patiently)."""

    def __init__(self, pki: Pki, folder: Path) -> None:
        self._folder = folder
        self.cert, self.key = folder / "catalog.pem", folder / "catalog-key.pem"
        self.cert.write_bytes(pki.catalog.cert.read_bytes())
        write_private(self.key, pki.catalog.key.read_bytes())
        self._ca = pki.ca
        self.new_ca = DevCA("the next client CA")

    def config(self, port: int) -> BrokerClientConfig:
        return BrokerClientConfig(
            target=f"127.0.0.1:{port}",
            ca_file=self._ca,
            cert_file=self.cert,
            key_file=self.key,
            reload_interval=0.1,
            retry=RetryPolicy(max_attempts=50, overall_deadline=30),
        )

    def renew(self) -> Path:
        """Replace the files with a certificate of the new CA; the new CA's file, for a broker
        that trusts only it."""
        renewed = self.new_ca.issue_files(
            self._folder / "renewed", "catalog", "catalog", uri=CATALOG_ID
        )
        write_private(self.key.with_name("staged"), renewed.key.read_bytes())
        os.replace(self.key.with_name("staged"), self.key)
        self.cert.write_bytes(renewed.cert.read_bytes())
        return self.new_ca.write_ca(self._folder / "new-ca.pem")
