"""The deploy kit (deploy/kubernetes, Containerfile) against the broker and OpenBao themselves:
the ConfigMap's broker.toml loads with the broker's own config loader, every file it names is
mounted in the pod (writable only where the broker writes), ports, user and grace period agree
with the config and the image, and the reference OpenBao config starts a real node that
unseals itself. Schemas and the security linter run in `make deploy-check` (deploy/check)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from broker.config import BrokerConfig, JwtAuth
from broker.config_loader import parse_config
from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until
from devstack.openbao import bao_binary
from devstack.pki import issue_loopback_server, write_private
from tests.support import Pki

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["overlays/dev", "overlays/prod"]
WRITTEN_BY_THE_BROKER = {"admin.state_file"}
"""Config keys naming files the broker writes: on a writable emptyDir. Every other file it names
is read only, from a read-only mount."""

Resource = dict[str, Any]


def render(kustomization: str) -> list[Resource]:
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / kustomization)],  # noqa: S607 (from PATH)
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [resource for resource in yaml.safe_load_all(built) if resource]


def only(resources: list[Resource], kind: str) -> Resource:
    found = [resource for resource in resources if resource["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def paths_in(table: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every absolute path the config names."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from paths_in(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value.startswith("/"):
            yield f"{prefix}{key}", value


class Pod:
    """The broker's pod as the Deployment describes it."""

    def __init__(self, resources: list[Resource]) -> None:
        self.deployment = only(resources, "Deployment")
        self.spec = self.deployment["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        self.volumes = {volume["name"]: volume for volume in self.spec["volumes"]}

    def mount_of(self, path: str) -> tuple[Resource, Resource]:
        """The volume mount ``path`` lies on (the deepest), and its volume."""
        mounts = [
            mount
            for mount in self.container["volumeMounts"]
            if path.startswith(mount["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, (
            f"{path} lies on no volume the pod mounts (the root file system is read-only)"
        )
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        return mount, self.volumes[mount["name"]]

    @property
    def config_path(self) -> str:
        args: list[str] = self.container["args"]
        return args[args.index("--config") + 1]

    @property
    def environ(self) -> dict[str, str]:
        return {env["name"]: env["value"] for env in self.container["env"] if "value" in env}

    def port(self, name: str) -> int:
        return int(next(p["containerPort"] for p in self.container["ports"] if p["name"] == name))


def broker_toml(resources: list[Resource], pod: Pod) -> dict[str, Any]:
    """The broker.toml the pod reads: from the ConfigMap its --config path is mounted from."""
    _, volume = pod.mount_of(pod.config_path)
    configmap = only(resources, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    return tomllib.loads(configmap["data"][Path(pod.config_path).name])


def place_files(document: dict[str, Any], root: Path, pki: Pki) -> dict[str, Any]:
    """The document with every absolute path moved under ``root``, where a file of the right
    kind is put: as the pod would see them mounted."""
    contents = {
        "server.cert_file": pki.server.cert.read_bytes(),
        "server.key_file": pki.server.key.read_bytes(),
        "server.client_ca_file": pki.ca.read_bytes(),
        "vault.ca_file": pki.ca.read_bytes(),
        "vault.auth.token_file": b"header.claims.signature",
        "audit.key_file": secrets.token_hex(32).encode(),
    }
    moved: dict[str, Any] = json.loads(json.dumps(document))
    for key, path in paths_in(document):
        placed = root / path.lstrip("/")
        placed.parent.mkdir(parents=True, exist_ok=True)
        if key in contents:
            write_private(placed, contents[key])
        *tables, name = key.split(".")
        table = moved
        for part in tables:
            table = table[part]
        table[name] = str(placed)
    return moved


def loaded(document: dict[str, Any], pod: Pod, pki: Pki, root: Path) -> BrokerConfig:
    """``document`` through the broker's own loader, its files placed under ``root``, with the
    environment the Deployment gives the container."""
    return parse_config(place_files(document, root, pki), root, environ=pod.environ)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_broker_toml_loads_and_every_file_it_names_is_mounted(
    overlay: str, pki: Pki, tmp_path: Path
) -> None:
    resources = render(overlay)
    pod = Pod(resources)
    document = broker_toml(resources, pod)

    named = dict(paths_in(document))
    assert set(named) >= {"server.cert_file", "audit.key_file", "vault.auth.token_file"}
    for key, path in named.items():
        mount, volume = pod.mount_of(path)
        if key in WRITTEN_BY_THE_BROKER:
            assert "emptyDir" in volume, f"{key}: the broker writes {path}"
            assert not mount.get("readOnly"), f"{key}: the broker writes {path}"
        else:
            assert mount.get("readOnly"), f"{key}: the broker only reads {path}"

    config = loaded(document, pod, pki, tmp_path)
    assert isinstance(config.vault.auth, JwtAuth)
    assert config.vault.auth.method == "kubernetes"
    assert len(config.vault.addresses) == 3, "every node of the reference OpenBao cluster"
    assert config.audit.file is None, "the trail goes to standard output"
    assert config.audit.key is not None, "chained with a key"
    categories = frozenset(spec.category for spec in config.secrets.values())
    assert config.startup_rollback.vault_categories == categories, "VAULT_ENABLED_SECRETS: all"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_grace_and_user_agree_with_the_config_and_the_image(
    overlay: str, pki: Pki, tmp_path: Path
) -> None:
    resources = render(overlay)
    pod = Pod(resources)
    config = loaded(broker_toml(resources, pod), pod, pki, tmp_path)
    assert pod.port("grpc") == int(config.server.listen.rsplit(":", 1)[1])
    assert config.metrics.listen is not None
    assert pod.port("metrics") == int(config.metrics.listen.rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pod.container[probe]["httpGet"]["port"] == "metrics"
    assert pod.container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod.container["livenessProbe"]["httpGet"]["path"] == "/healthz"

    drain = config.server.shutdown_delay + config.server.shutdown_grace
    assert pod.spec["terminationGracePeriodSeconds"] > drain, "the kubelet would SIGKILL a drain"

    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Containerfile").read_text(), re.M)
    assert user is not None
    security = pod.spec["securityContext"]
    assert (security["runAsUser"], security["fsGroup"]) == (int(user[1]), int(user[2]))

    for service in (r for r in resources if r["kind"] == "Service"):
        assert service["spec"]["selector"] == pod.deployment["spec"]["selector"]["matchLabels"]
    monitor = only(resources, "PodMonitor")
    job = pod.deployment["spec"]["template"]["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == "secretbroker", 'the rules select job="secretbroker"'


def test_the_prometheus_rule_is_the_promtool_tested_rules_file() -> None:
    checked = subprocess.run(
        [sys.executable, KUBERNETES / "prometheusrule.py", "--check"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr


def test_the_reference_openbao_config_starts_a_node_that_unseals_itself_after_a_restart(
    pki: Pki, tmp_path: Path
) -> None:
    """deploy/kubernetes/openbao/config.hcl as it is, but for its paths and listen addresses:
    TLS listener, raft storage, static auto-unseal and unauthenticated metrics, on a real
    OpenBao. (retry_join names the pods' DNS names, which do not resolve here: the node keeps
    trying them until it is initialised alone.)"""
    port = free_port_pair()
    tls = tmp_path / "tls"
    tls.mkdir()
    server = issue_loopback_server(pki.authority, tls)
    (tls / "tls.crt").write_bytes(server.cert.read_bytes())
    write_private(tls / "tls.key", server.key.read_bytes())
    (tls / "ca.crt").write_bytes(pki.ca.read_bytes())
    (tmp_path / "seal").mkdir()
    write_private(tmp_path / "seal" / "key", secrets.token_bytes(32))
    (tmp_path / "data").mkdir()
    hcl = (KUBERNETES / "openbao" / "config.hcl").read_text()
    hcl = hcl.replace("/openbao/", f"{tmp_path}/")
    hcl = hcl.replace('"[::]:8200"', f'"127.0.0.1:{port}"')
    hcl = hcl.replace('"[::]:8201"', f'"127.0.0.1:{port + 1}"')
    (tmp_path / "config.hcl").write_text(hcl)
    address = f"https://127.0.0.1:{port}"
    environ = {
        "BAO_RAFT_NODE_ID": "openbao-0",
        "BAO_API_ADDR": address,
        "BAO_CLUSTER_ADDR": f"https://127.0.0.1:{port + 1}",
        "PATH": "/usr/bin:/bin",
    }

    def health() -> int:
        return requests.get(f"{address}/v1/sys/health", verify=str(pki.ca), timeout=2).status_code

    def start() -> subprocess.Popen[bytes]:
        argv = die_with_parent([bao_binary(), "server", f"-config={tmp_path / 'config.hcl'}"])
        with (tmp_path / "bao.log").open("ab") as log:  # the child keeps its own copy
            return subprocess.Popen(argv, env=environ, stdout=log, stderr=subprocess.STDOUT)

    process = start()
    try:
        wait_until(lambda: health() == 501, what="answering, not initialised", ignoring=(OSError,))
        initialised = requests.put(
            f"{address}/v1/sys/init",
            json={"recovery_shares": 1, "recovery_threshold": 1},
            verify=str(pki.ca),
            timeout=30,
        )
        assert initialised.status_code == 200, initialised.status_code
        wait_until(lambda: health() == 200, what="active", timeout=60)
        stop_process(process)
        started = time.monotonic()
        process = start()
        wait_until(
            lambda: health() == 200, what="unsealed itself, active", ignoring=(OSError,), timeout=60
        )
        assert time.monotonic() - started < 60
        metrics = requests.get(
            f"{address}/v1/sys/metrics",
            params={"format": "prometheus"},
            verify=str(pki.ca),
            timeout=5,
        )
        assert metrics.status_code == 200, "Prometheus scrapes without a token"
    finally:
        stop_process(process)
