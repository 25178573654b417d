"""The layout is the architecture: who may import whom, checked on the source (every import
statement, those inside functions included)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level names each module of ``package`` imports (``grpc``, ``broker``, ...), and the
    two-level name for the project's own packages (``secretbroker.client``)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = {
            ".".join(name.split(".")[:2]) if name.startswith("secretbroker") else name.split(".")[0]
            for name in names
        }
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("broker", {"catalog", "devstack", "bench", "tests"}),
        ("catalog", {"broker", "devstack", "bench", "tests"}),
        ("secretbroker/client", {"broker", "catalog", "devstack", "bench", "tests", "hvac"}),
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
        for module, names in imports_of("secretbroker/client").items()
        if names - allowed
    }
    assert not extra, f"the SDK imports {extra}"
