"""deploy/prometheus and deploy/grafana against the real tools: promtool checks and unit-tests
the rules; every series the rules and the dashboard name is one a real broker exports (or a
rule records); a real Prometheus scrapes a real broker and fires the Vault-down alert when
OpenBao stops."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until
from tests.support import API, DATABASE, BrokerFactory, Pki, RunningBroker, Vault, get

DEPLOY = Path(__file__).parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "secretbroker-rules.yml"
PROMTOOL = shutil.which("promtool") or "promtool"  # Debian package prometheus; .ci/run installs it
PROMETHEUS = shutil.which("prometheus") or "prometheus"
SERIES = re.compile(r"\bsecretbroker[_:][a-z0-9_:]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=DEPLOY
    )


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "prometheus/secretbroker-rules.yml"),
        ("check", "config", "prometheus/prometheus.yml"),
        ("test", "rules", "prometheus/tests/secretbroker-rules.test.yml"),
    ],
    ids=["check rules", "check config", "test rules"],
)
def test_promtool_accepts_the_rules_and_their_unit_tests_pass(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr",) and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_every_series_named_by_rules_and_dashboard_exists(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    broker = start_broker(vault, secrets_={DATABASE: {}, API: {"rotation": {"key": "value"}}})
    get(broker.stub(pki.catalog, pki.ca), DATABASE)
    _, text = broker.scrape()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    # Families this broker has no series of (database leases: it declares no database secret)
    # are still declared; test_database_credentials.py scrapes their series.
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exported |= {f"{name}_total" for name in declared} | declared
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads((DEPLOY / "grafana" / "secretbroker-dashboard.json").read_text())
    assert dashboard["panels"], "the dashboard has panels"

    for source, document in (("rules", rules), ("dashboard", dashboard)):
        for expr in _expressions(document):
            for name in SERIES.findall(expr):
                assert name in exported or name in recorded, f"{source}: {name} does not exist"
                assert not name.endswith(HISTOGRAM_SUFFIXES) or name in exported


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[RunningBroker], str]]:
    """Start a real Prometheus scraping the given broker every 500ms, with the deploy rules
    evaluated every 500ms and the Vault-down alert's ``for`` cut to 1s. Yields its URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(broker: RunningBroker) -> str:
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "500ms"
            for rule in group["rules"]:
                if rule.get("alert") == "SecretBrokerVaultDown":
                    rule["for"] = "1s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [
                {
                    "job_name": "secretbroker",
                    "static_configs": [{"targets": [f"127.0.0.1:{broker.broker.metrics_port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port_pair()
        with (tmp_path / "prometheus.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    die_with_parent(
                        [
                            PROMETHEUS,
                            f"--config.file={tmp_path / 'prometheus.yml'}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{port}",
                        ]
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        stop_process(process, timeout=30)


def _api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:  # noqa: S310
        return json.loads(response.read())["data"]


def _wait_for(what: str, check: Callable[[], bool]) -> None:
    wait_until(check, timeout=60, what=what, ignoring=(OSError,))  # OSError: still starting


def test_real_prometheus_scrapes_the_broker_and_fires_vault_down(
    private_vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    prometheus: Callable[[RunningBroker], str],
) -> None:
    broker = start_broker(
        private_vault, metrics={"listen": "127.0.0.1:0", "vault_probe_interval": "200ms"}
    )
    get(broker.stub(pki.catalog, pki.ca), DATABASE)  # a hit: the warm-up read it
    url = prometheus(broker)

    def broker_series() -> bool:
        result = _api(url, "query", query='secretbroker_cache_lookups_total{result="hit"}')
        return bool(result["result"]) and result["result"][0]["value"][1] == "1"

    _wait_for("the broker's series in Prometheus", broker_series)
    up = _api(url, "query", query="secretbroker_vault_up")["result"]
    assert [sample["value"][1] for sample in up] == ["1"]

    private_vault.server.stop()

    def vault_down_firing() -> bool:
        alerts = _api(url, "alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "SecretBrokerVaultDown" and a["state"] == "firing"
            for a in alerts
        )

    _wait_for("SecretBrokerVaultDown to fire", vault_down_firing)
