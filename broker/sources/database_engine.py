"""Credentials from Vault's database secrets engine: issue, renew and revoke one lease, with
the broker's own token. Blocking: run it off the event loop (core/leases.py decides when).

Renewal and revocation use the URL forms (``sys/leases/renew/LEASE_ID``), so a policy can limit
them to the role's own leases (``sys/leases/revoke/database/creds/ROLE/*``); hvac's methods put
the lease id in the body, which needs ``update`` on every lease in Vault.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from broker.config import DatabaseCredentialsSpec, VaultConfig
from broker.config_reader import Sensitive
from broker.sources.vault import rfc3339_seconds
from broker.sources.vault_errors import translate_vault_errors
from broker.sources.vault_session import VaultSession


@dataclass(frozen=True)
class Lease:
    """One set of database credentials and the Vault lease they live by. Its repr names the
    lease and the user, never the password."""

    lease_id: str
    username: str
    password: Sensitive
    duration: float
    """Seconds Vault granted at issue: what each renewal asks for again."""
    issued_at: float
    """Unix time of the issue."""
    token_generation: int
    """The broker's login that read it (VaultSession.generation): the lease dies with that
    token, so a new login calls for a successor."""

    def __repr__(self) -> str:
        return f"Lease({self.lease_id!r}, user={self.username!r})"


@dataclass(frozen=True)
class StaticCredentials:
    """A static role's user and its current password. Its repr names the user only."""

    username: str
    password: Sensitive
    rotated_at: float
    """When the engine last set the password (Unix time)."""
    next_rotation_in: float
    """Seconds until the engine's next rotation, as it said at the read."""

    def __repr__(self) -> str:
        return f"StaticCredentials(user={self.username!r})"


class DatabaseEngine:
    def __init__(self, config: VaultConfig, session: VaultSession) -> None:
        self._config = config
        self.session = session

    def issue(self, database: DatabaseCredentialsSpec) -> Lease:
        operation = f"issue of credentials from {database.mount}/creds/{database.role}"

        def issue() -> tuple[int, Any]:
            generation = self.session.generation  # after with_token's login, if it logged in
            body = self.session.nodes.call(
                "issue",
                operation,
                lambda client: client.secrets.database.generate_credentials(
                    database.role, mount_point=database.mount
                ),
                write=True,
            )
            return generation, body

        generation, body = self.session.with_token(issue)
        with translate_vault_errors(operation, self._config.timeout):  # for the body's shape
            return Lease(
                lease_id=str(body["lease_id"]),
                username=str(body["data"]["username"]),
                password=Sensitive(str(body["data"]["password"])),
                duration=float(body["lease_duration"]),
                issued_at=time.time(),
                token_generation=generation,
            )

    def static_credentials(self, database: DatabaseCredentialsSpec) -> StaticCredentials:
        operation = f"read of {database.mount}/static-creds/{database.role}"
        body: Any = self.session.with_token(
            lambda: self.session.nodes.call(
                "static",
                operation,
                lambda client: client.secrets.database.get_static_credentials(
                    database.role, mount_point=database.mount
                ),
            )
        )
        with translate_vault_errors(operation, self._config.timeout):
            data = body["data"]
            return StaticCredentials(
                username=str(data["username"]),
                password=Sensitive(str(data["password"])),
                rotated_at=rfc3339_seconds(str(data["last_vault_rotation"])),
                next_rotation_in=float(data["ttl"]),
            )

    def renew(self, lease: Lease, increment: float) -> float:
        """Ask for ``increment`` more seconds from now; returns what Vault granted, which is
        less near the role's max TTL."""
        operation = f"renewal of lease {lease.lease_id}"
        body: Any = self.session.with_token(
            lambda: self.session.nodes.call(
                "renew",
                operation,
                lambda client: client.adapter.put(
                    f"/v1/sys/leases/renew/{lease.lease_id}",
                    json={"increment": max(1, round(increment))},
                ),
                write=True,
            )
        )
        with translate_vault_errors(operation, self._config.timeout):
            return float(body["lease_duration"])

    def revoke(self, lease: Lease) -> None:
        """Synchronous: returns once the role's revocation statements ran (they end the user's
        sessions and drop it); raises when they failed, and the lease then stays."""
        operation = f"revocation of lease {lease.lease_id}"
        self.session.with_token(
            lambda: self.session.nodes.call(
                "revoke",
                operation,
                lambda client: client.adapter.put(f"/v1/sys/leases/revoke/{lease.lease_id}"),
                write=True,
            )
        )
