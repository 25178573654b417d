"""Which Vault node a call goes to: the broker's side of an OpenBao raft cluster.

hvac talks to one URL and has no failover, so node selection is ours. Each node has
its own hvac client (one connection pool per node). A call tries the nodes in order
of preference and moves to the next one when a node cannot answer: refused
connection, timeout, 5xx, sealed, or a 307 to a leader that is gone (hvac follows it
and fails to connect). Any other answer (denied, missing, a check-and-set conflict)
is Vault's word and ends the call. Each attempt has ``vault.timeout``, and the whole
call ``vault.call_budget``: an attempt gets at most what is left of it, so a call
that meets hung nodes ends within the budget, not a timeout per node. The health
probe takes a node that fails out of first place for every later call.

- Reads go to any usable node, since standbys serve reads. Each broker starts at a
  random node, so replicas spread their reads over the cluster.
- Writes (rotation, login, renewal, revocation) go to the active node first; a
  standby would forward them anyway.
- Read-your-writes: after this broker writes a secret, every later request carries
  the write's ``X-Vault-Index`` with ``X-Vault-Inconsistent: forward-active-node``,
  so a standby that has not applied the write yet forwards the read to the active
  node instead of answering with the version from before it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import hvac
import requests
import requests.adapters

from broker.config import VaultConfig
from broker.errors import LoginRefused, SourceUnavailable
from broker.sources.node_health import NodeHealth, NodeRole, role_of_status
from broker.sources.observer import Unobserved, VaultObserver
from broker.sources.vault_errors import translate_vault_errors

log = logging.getLogger(__name__)
T = TypeVar("T")


class _BudgetedAdapter(requests.adapters.HTTPAdapter):
    """A transport whose timeout never exceeds what is left of the calling thread's Vault call
    budget (hvac passes its fixed timeout with every request)."""

    def __init__(self, budget: threading.local) -> None:
        super().__init__()
        self._budget = budget

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        deadline: float | None = getattr(self._budget, "deadline", None)
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.001)
            timeout = kwargs.get("timeout")
            kwargs["timeout"] = left if not isinstance(timeout, int | float) else min(timeout, left)
        return super().send(request, *args, **kwargs)


INDEX_HEADER = "X-Vault-Index"
INCONSISTENT_HEADER = "X-Vault-Inconsistent"


class VaultNode:
    """One node: its address, its client, and what the broker last learnt about it."""

    def __init__(self, address: str, client: hvac.Client) -> None:
        self.address = address
        self.client = client
        self.health = NodeHealth(address, reachable=True, role=NodeRole.UNKNOWN)
        self.failed = False
        """The last call to this node could not reach it; cleared by a success or a probe."""

    @property
    def preferred(self) -> bool:
        return not self.failed and self.health.role in (
            NodeRole.ACTIVE,
            NodeRole.STANDBY,
            NodeRole.UNKNOWN,
        )


class VaultNodes:
    """Every configured node, and the one way to send a call to the cluster."""

    def __init__(self, config: VaultConfig, observer: VaultObserver | None = None) -> None:
        self._config = config
        self._observer = observer or Unobserved()
        self._index_lock = threading.Lock()
        self._budget = threading.local()
        self.nodes = [VaultNode(address, self._client(address, "")) for address in config.addresses]
        start = random.randrange(len(self.nodes))  # noqa: S311 (spreading load, not a secret)
        self._home = self.nodes[start:] + self.nodes[:start]
        self._probe_pool: ThreadPoolExecutor | None = None

    # calls ---------------------------------------------------------------------------------

    def set_token(self, token: str) -> None:
        for node in self.nodes:
            node.client.token = token

    def call(
        self,
        operation: str,
        description: str,
        call: Callable[[hvac.Client], T],
        *,
        write: bool = False,
        login: bool = False,
        token: str | None = None,
        prefer_active: bool = False,
    ) -> T:
        """Run ``call`` on the first node that can answer (see the module docstring). Counted
        as one Vault call of ``operation``; ``description`` names it in errors. With
        ``token``, the call runs with that token instead of the broker's current one. With
        ``prefer_active``, a read goes to the active node first (it holds every write)."""
        outer: float | None = getattr(self._budget, "deadline", None)
        deadline = time.monotonic() + self._config.call_budget
        self._budget.deadline = deadline if outer is None else min(outer, deadline)
        try:
            with self._observer.vault_call(operation):
                return self._attempts(description, call, write or prefer_active, login, token)
        finally:
            self._budget.deadline = outer

    def _attempts(
        self,
        description: str,
        call: Callable[[hvac.Client], T],
        active_first: bool,
        login: bool,
        token: str | None,
    ) -> T:
        timeout = self._config.timeout
        unreachable: list[str] = []
        for node in self._order(active_first):
            if unreachable and time.monotonic() >= self._budget.deadline:
                log.debug("%s: vault.call_budget spent", description)
                break
            try:
                with (
                    self._observer.vault_node_call(node.address),
                    translate_vault_errors(description, timeout, login=login),
                    self._client_for(node, token) as client,
                ):
                    result = call(client)
            except LoginRefused:
                raise  # Vault answered, and refuses the credential: no node will differ
            except SourceUnavailable as exc:
                node.failed = True
                unreachable.append(str(exc))
                if len(self.nodes) > 1:
                    log.debug("vault node %s failed %s: %s", node.address, description, exc)
                continue
            node.failed = False
            return result
        if len(self.nodes) == 1:
            raise SourceUnavailable(unreachable[0])
        raise SourceUnavailable(
            f"no vault node answered {description} ({len(unreachable)} tried; first: "
            f"{unreachable[0]})"
        )

    def _order(self, active_first: bool) -> list[VaultNode]:
        """Preferred nodes first, from this broker's home node on; for a write, the active
        node before them. Nodes that failed last are still tried, last: a probe may be old."""
        preferred = [node for node in self._home if node.preferred]
        if active_first:
            preferred.sort(key=lambda node: node.health.role is not NodeRole.ACTIVE)
        return preferred + [node for node in self._home if not node.preferred]

    @contextmanager
    def _client_for(self, node: VaultNode, token: str | None) -> Iterator[hvac.Client]:
        if token is None:
            yield node.client
            return
        client = self._client(node.address, token)
        try:
            yield client
        finally:
            client.adapter.close()

    def _client(self, address: str, token: str) -> hvac.Client:
        """A client holding ``token`` and no other: hvac would otherwise pick up VAULT_TOKEN or
        ~/.vault-token (which a dev server writes) for a client made without one, and the
        broker uses no credential but its own login."""
        client = hvac.Client(
            url=address,
            token=token,
            timeout=self._config.timeout,
            verify=str(self._config.ca_file) if self._config.ca_file else True,
        )
        budgeted = _BudgetedAdapter(self._budget)
        for scheme in ("http://", "https://"):
            client.adapter.session.mount(scheme, budgeted)
        client.adapter.session.hooks["response"].append(self._remember_write_index)
        return client

    def _remember_write_index(self, response: requests.Response, *_: object, **__: object) -> None:
        """After a secret write, send its index with every later request (module docstring)."""
        request = response.request
        index = response.headers.get(INDEX_HEADER)
        if (
            index is None
            or request.method not in ("POST", "PUT", "PATCH")
            or f"/v1/{self._config.mount}/data/" not in (request.path_url or "")
        ):
            return
        with self._index_lock:
            for node in self.nodes:
                headers = node.client.adapter.session.headers
                headers[INDEX_HEADER] = index
                headers[INCONSISTENT_HEADER] = "forward-active-node"

    # health --------------------------------------------------------------------------------

    def probe(self) -> list[NodeHealth]:
        """Ask every node's /sys/health at once (a hung node costs ``vault.timeout``, not one
        per node) and remember the answers for ``call``'s order. Needs no token."""
        if self._probe_pool is None:
            self._probe_pool = ThreadPoolExecutor(len(self.nodes), thread_name_prefix="vault-probe")
        return list(self._probe_pool.map(self._probe_one, self.nodes))

    def _probe_one(self, node: VaultNode) -> NodeHealth:
        try:
            response = node.client.adapter.session.get(
                f"{node.address}/v1/sys/health",
                timeout=self._config.timeout,
                verify=str(self._config.ca_file) if self._config.ca_file else True,
                allow_redirects=False,
            )
            role = role_of_status(response.status_code)
            health = NodeHealth(node.address, reachable=True, role=role)
        except requests.RequestException:
            health = NodeHealth(node.address, reachable=False, role=NodeRole.UNKNOWN)
        self._observer.vault_node_request(node.address, "ok" if health.reachable else "unavailable")
        node.health = health
        node.failed = not health.usable
        return health

    def close(self) -> None:
        if self._probe_pool is not None:
            self._probe_pool.shutdown(wait=False, cancel_futures=True)
        for node in self.nodes:
            node.client.adapter.close()
