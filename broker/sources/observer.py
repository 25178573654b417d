"""What the Vault source reports as it works, and nothing about where it goes.

The metrics implement this protocol (broker/observe/metrics.py); the sources never import
them, so the layer that talks to Vault knows no Prometheus. State the sources hold (node
health, the token's expiry) is not reported here: the metrics read it at scrape time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class VaultObserver(Protocol):
    def vault_call(self, operation: str) -> AbstractContextManager[None]:
        """One call to Vault, whichever nodes it took (``operation``: "read", "login", ...)."""
        ...

    def vault_node_call(self, node: str) -> AbstractContextManager[None]:
        """One attempt of a call on one node."""
        ...

    def vault_node_request(self, node: str, outcome: str) -> None:
        """One request to a node outside a call (a health probe), by outcome."""
        ...


class Unobserved:
    """The observer of a source nobody watches (tools, tests)."""

    def vault_call(self, operation: str) -> AbstractContextManager[None]:
        return nullcontext()

    def vault_node_call(self, node: str) -> AbstractContextManager[None]:
        return nullcontext()

    def vault_node_request(self, node: str, outcome: str) -> None:
        pass
