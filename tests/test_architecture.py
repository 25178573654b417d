"""The layout is the architecture: who may import whom, checked on the source (every import
statement, those inside functions included)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def full_imports(package: str) -> dict[str, set[str]]:
    """The dotted names each module of ``package`` imports, by its path."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level names each module of ``package`` imports (``grpc``, ``broker``, ...), and the
    two-level name for the project's own packages (``secretbroker.client``)."""
    return {
        module: {
            ".".join(name.split(".")[:2]) if name.startswith("secretbroker") else name.split(".")[0]
            for name in names
        }
        for module, names in full_imports(package).items()
    }


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("broker", {"catalog", "devstack", "bench", "tests"}),
        ("catalog", {"broker", "devstack", "bench", "tests"}),
        ("sdk/secretbroker/client", {"broker", "catalog", "devstack", "bench", "tests", "hvac"}),
    ],
)
def test_packages_do_not_import_what_they_must_not_depend_on(
    package: str, forbidden: set[str]
) -> None:
    offending = {
        module: sorted(names & forbidden)
        for module, names in imports_of(package).items()
        if names & forbidden
    }
    assert not offending, f"{package} imports {offending}"


def test_the_client_sdk_needs_only_grpcio_and_the_generated_code() -> None:
    allowed = {"__future__", "grpc", "google", "secretbroker.client", "secretbroker.v1"}
    allowed |= set(sys.stdlib_module_names)
    extra = {
        module: sorted(names - allowed)
        for module, names in imports_of("sdk/secretbroker/client").items()
        if names - allowed
    }
    assert not extra, f"the SDK imports {extra}"


def broker_layers() -> dict[str, set[str]]:
    """Each module of ``broker`` (``broker/core/cache.py`` as ``core.cache``) with the modules
    of ``broker`` it imports, as the same dotted names."""
    return {
        ".".join(Path(path).relative_to("broker").with_suffix("").parts): {
            name.removeprefix("broker.") for name in names if name.startswith("broker.")
        }
        for path, names in full_imports("broker").items()
    }


def layer_of(module: str) -> str:
    """``core.cache`` is in ``core``; a module at the top of ``broker`` is its own layer."""
    return module.split(".")[0]


@pytest.mark.parametrize(
    ("layer", "forbidden", "why"),
    [
        ("sources", {"api", "core", "observe", "tools"}, "sources talk to Vault and env only"),
        ("core", {"api", "tools"}, "the decisions know nothing of gRPC"),
        ("security", {"api", "core", "sources", "tools"}, "who is calling, nothing else"),
        ("audit", {"api", "core", "sources", "observe", "tools"}, "a sink for records"),
        ("api", {"tools"}, "the servers never run CLI tools"),
        ("observe", {"api", "tools"}, "watching the broker, not serving it"),
    ],
)
def test_each_layer_imports_only_the_layers_below_it(
    layer: str, forbidden: set[str], why: str
) -> None:
    offending = {
        module: sorted(name for name in imported if layer_of(name) in forbidden)
        for module, imported in broker_layers().items()
        if layer_of(module) == layer and any(layer_of(name) in forbidden for name in imported)
    }
    assert not offending, f"{layer} ({why}) imports {offending}"


def test_only_the_cli_imports_the_tools() -> None:
    importers = {
        module
        for module, imported in broker_layers().items()
        if layer_of(module) != "tools" and any(layer_of(name) == "tools" for name in imported)
    }
    assert importers <= {"cli"}, f"tools are imported by {sorted(importers - {'cli'})}"


def test_sources_report_through_their_observer_not_the_metrics() -> None:
    """The Vault source counts its calls through broker.sources.observer.VaultObserver,
    which the metrics implement: no Prometheus in the layer that talks to Vault."""
    for module, imported in imports_of("broker/sources").items():
        assert "prometheus_client" not in imported, module
    assert all(
        "observe.metrics" not in imported
        for module, imported in broker_layers().items()
        if layer_of(module) == "sources"
    )


def test_only_the_metrics_package_touches_prometheus_objects() -> None:
    users = {
        module
        for module, imported in imports_of("broker").items()
        if "prometheus_client" in imported
    }
    assert users == {"broker/observe/metrics.py", "broker/observe/metrics_http.py"}


def test_at_most_twelve_modules_stay_at_the_top_of_broker() -> None:
    top = sorted(path.name for path in (ROOT / "broker").glob("*.py"))
    assert len(top) <= 12, top


def test_test_modules_share_helpers_through_support_not_each_other() -> None:
    """Helpers live in tests/support.py (and the harness, devstack/harness.py); fixtures in
    conftest.py, which pytest loads itself: no test module imports another, or conftest."""
    offending = {
        module: sorted(name for name in names if name.startswith(("tests.test_", "tests.conftest")))
        for module, names in full_imports("tests").items()
        if any(name.startswith(("tests.test_", "tests.conftest")) for name in names)
    }
    assert not offending, offending
