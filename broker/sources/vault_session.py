"""The broker's Vault login: one token, renewed before expiry, replaced when renewal cannot help.

Behaves like Vault Agent's auto-auth: log in (AppRole, or a given token in dev),
renew at two thirds of the lease, and log in again when a renewal is refused, when
the token is dead (revoked or expired), or when Vault grants less than asked because
the token's max TTL is near. A token that is replaced is revoked, best effort, so
logins never pile up live tokens in Vault.

A refused read does not by itself mean the token is dead: the broker's policy may
simply not cover the path. So a refusal is checked with lookup-self first, at most
once per RELOGIN_BACKOFF for a token found alive, and a dead token is replaced at
most once per RELOGIN_BACKOFF: no caller can make the broker log in (and spend
``secret_id`` uses) by asking for what its policy refuses.

All methods block on network I/O; callers run them off the event loop. The lock
serialises logins and token checks only: reads never wait on it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hvac

from broker.config import AppRoleAuth, JwtAuth, TokenAuth, VaultAuth, VaultConfig
from broker.config_reader import Sensitive
from broker.errors import BrokerError, LoginRefused, SourceDenied, SourceUnavailable
from broker.names import quoted
from broker.sources.node_health import NodeHealth
from broker.sources.observer import VaultObserver
from broker.sources.vault_nodes import VaultNodes

log = logging.getLogger(__name__)
T = TypeVar("T")

RENEW_AT_FRACTION = 2 / 3
RELOGIN_BACKOFF = 10.0
"""Seconds during which a refused token is not checked again when found alive, nor replaced
again when found dead."""


class VaultSession:
    def __init__(
        self,
        config: VaultConfig,
        clock: Callable[[], float] = time.monotonic,
        observer: VaultObserver | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self.nodes = VaultNodes(config, observer)
        self._login_lock = threading.Lock()
        self._token: str | None = None
        self._lease_seconds = 0.0
        self._expires_at: float | None = None  # None: not logged in, or a token that never expires
        self.token_expires_at = 0.0
        """When the token expires (Unix time, for the metrics); 0: none yet, or never."""
        self._renewable = False
        self._checked_alive: tuple[str, float] | None = None  # token and when lookup-self passed
        self._replaced_at: float | None = None
        self._unwrapped: tuple[bytes, Sensitive] | None = None  # wrapping token digest, secret_id
        self._refused: LoginRefused | None = None
        """Vault's refusal of the last login, until a login succeeds."""
        self.generation = 0
        """Counts logins: what a lease read with the token remembers (core/leases.py)."""
        self.on_login: list[Callable[[], None]] = []
        """Called (on the logging-in thread) after every login."""
        self.keep_replaced_tokens = False
        """Leave a replaced token to expire instead of revoking it: set while the broker holds
        database leases, which Vault revokes with the token that read them. Their keeper moves
        them to the new token within the old token's remaining lease."""

    def token(self) -> str:
        """The current token, logging in first when there is none; but not after Vault refused
        the last login: then only the token keeper tries again, with its backoff. Vault locks a
        role out after a few refused logins in a row (user lockout), and no read may add to
        them."""
        token = self._token
        if token is not None:
            return token
        with self._login_lock:
            if self._token is not None:
                return self._token  # another thread logged in meanwhile
            if self._refused is not None:
                raise LoginRefused(str(self._refused))
            return self._login()

    def with_token(self, call: Callable[[], T]) -> T:
        """``call`` with the current token (the nodes hold it). A dead token (revoked, expired)
        looks like the policy refusing the path: retry once only when it was found dead and
        replaced."""
        token = self.token()
        try:
            return call()
        except SourceDenied:
            if not self.replace_if_dead(token):
                raise
            return call()

    def replace_if_dead(self, rejected: str) -> bool:
        """Vault refused a call made with ``rejected``. True when a retry can help: another
        thread has replaced the token already, or it was dead and is replaced now. False when
        the token is alive (the refusal is the broker's policy: no login would help), or when
        a dead token was replaced less than RELOGIN_BACKOFF ago."""
        with self._login_lock:
            if self._token != rejected:
                return self._token is not None
            now = self._clock()
            checked = self._checked_alive
            if (
                checked is not None
                and checked[0] == rejected
                and now - checked[1] < RELOGIN_BACKOFF
            ):
                return False
            if self._alive(rejected):
                self._checked_alive = (rejected, now)
                return False
            if self._replaced_at is not None and now - self._replaced_at < RELOGIN_BACKOFF:
                log.warning(
                    "vault token is dead, and was replaced %.0fs ago; not again yet",
                    now - self._replaced_at,
                )
                return False
            log.info("vault no longer accepts the broker token; logging in again")
            self._replace(rejected)
            return True

    @property
    def authenticated(self) -> bool:
        return self._token is not None

    def probe(self) -> list[NodeHealth]:
        """Every node's /sys/health (reachable, active, standby, sealed). Needs no token."""
        return self.nodes.probe()

    def seconds_until_renewal(self) -> float | None:
        """When the keeper should act next; None for a token that never expires."""
        if self._token is None:
            return 0.0
        if self._expires_at is None:
            return None
        remaining = self._expires_at - self._clock()
        return (
            max(0.0, remaining * RENEW_AT_FRACTION)
            if self._renewable
            else max(0.0, remaining - 1.0)
        )

    def renew_or_login(self) -> None:
        """Extend the token's lease; log in again when that is refused or capped by max TTL."""
        token = self._token
        if token is None or not self._renewable:
            self._login_if_current(token)
            return
        requested = max(1, round(self._lease_seconds))
        try:
            auth = self.nodes.call(
                "renew",
                "token renewal",
                lambda client: client.auth.token.renew_self(increment=f"{requested}s")["auth"],
                write=True,
            )
            granted = float(auth["lease_duration"])
        except SourceDenied:
            log.info("vault refused to renew the broker token; logging in again")
            self._replace_if_current(token)
            return
        if granted < requested and not isinstance(self._config.auth, TokenAuth):
            log.info("vault token nears its max TTL (%.0fs left); logging in again", granted)
            self._replace_if_current(token)
            return
        self._set_lease(granted, renewable=bool(auth.get("renewable")))
        log.debug("renewed vault token for %.0fs", granted)

    def _login_if_current(self, seen: str | None) -> str:
        with self._login_lock:
            if self._token is not None and self._token != seen:
                return self._token  # another thread logged in meanwhile
            return self._login()

    def _replace_if_current(self, old: str) -> None:
        with self._login_lock:
            if self._token == old:
                self._replace(old)

    def _replace(self, old: str) -> None:
        """Log in, then revoke ``old`` (best effort: a dead token cannot be revoked, and a
        failed revocation must not fail the login). Holds the login lock."""
        self._login()
        self._replaced_at = self._clock()
        if isinstance(self._config.auth, TokenAuth):
            return  # a given token is not ours to revoke
        if self.keep_replaced_tokens:
            log.info("the replaced vault token is left to expire: leases were read with it")
            return
        try:
            self.nodes.call(
                "revoke",
                "revocation of the old token",
                lambda client: client.auth.token.revoke_self(),
                write=True,
                token=old,
            )
        except BrokerError as exc:
            log.debug("the replaced vault token was not revoked: %s", exc)

    def _alive(self, token: str) -> bool:
        """Whether Vault still accepts ``token`` (lookup-self). Raises SourceUnavailable."""
        try:
            self.nodes.call(
                "lookup",
                "token lookup",
                lambda client: client.auth.token.lookup_self(),
                token=token,
            )
        except SourceDenied:
            return False
        return True

    def _login(self) -> str:
        auth = self._config.auth
        if isinstance(auth, TokenAuth):
            token = _static_token(auth)
            data = self.nodes.call(
                "login",
                "token lookup",
                lambda client: client.auth.token.lookup_self()["data"],
                token=token,
            )
            lease, renewable = float(data["ttl"]), bool(data["renewable"])
        else:
            login, operation = self._login_call(auth)
            try:
                result = self.nodes.call(
                    "login", operation, lambda client: login(client)["auth"], write=True, login=True
                )
            except LoginRefused as exc:
                self._refused = exc
                raise
            self._refused = None
            token = str(result["client_token"])
            lease, renewable = float(result["lease_duration"]), bool(result["renewable"])
        self.nodes.set_token(token)
        self._token = token
        self.generation += 1
        self._set_lease(lease, renewable)
        log.info(
            "logged in to vault (%s); token lease %s",
            _method(auth),
            f"{lease:.0f}s" if lease else "does not expire",
        )
        for listener in self.on_login:
            listener()
        return token

    def _login_call(self, auth: JwtAuth | AppRoleAuth) -> tuple[Callable[[hvac.Client], Any], str]:
        """The login request for ``auth`` (credential files read now), and its description."""
        if isinstance(auth, JwtAuth):
            # Re-read at every login: a projected service-account token is rotated in place.
            jwt = _read_credential(auth.token_file, "vault.auth.token_file")
            if auth.method == "kubernetes":
                return (
                    lambda client: client.auth.kubernetes.login(
                        auth.role, jwt, use_token=False, mount_point=auth.mount
                    ),
                    f"kubernetes login (role {auth.role!r})",
                )
            return (
                lambda client: client.auth.jwt.jwt_login(
                    auth.role, jwt, use_token=False, path=auth.mount
                ),
                f"jwt login (role {auth.role!r})",
            )
        role_id = _read_credential(auth.role_id_file, "vault.auth.role_id_file")
        secret_id = _read_credential(auth.secret_id_file, "vault.auth.secret_id_file")
        if auth.secret_id_wrapping_path is not None:
            secret_id = self._unwrap_secret_id(auth, secret_id, auth.secret_id_wrapping_path)
        return (
            lambda client: client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=auth.mount, use_token=False
            ),
            "approle login",
        )

    def _unwrap_secret_id(self, auth: AppRoleAuth, wrapping_token: str, expected_path: str) -> str:
        """The secret_id inside ``wrapping_token``, unwrapped at the first login that reads this
        token and kept in memory for the logins after it (a wrapping token works once). Before
        unwrapping, checks that Vault created the token at ``expected_path``: a token wrapping
        anything else (say, a secret_id of another role, or a token someone made to be
        trusted) is refused. A token that is already used or expired may have been intercepted:
        the login fails, saying so, until a new wrapped secret_id is dropped in place."""
        digest = hashlib.sha256(wrapping_token.encode()).digest()
        if self._unwrapped is not None and self._unwrapped[0] == digest:
            return self._unwrapped[1].reveal()
        info = self.nodes.call(
            "unwrap",
            "lookup of the wrapped secret_id",
            lambda client: client.adapter.post(
                "/v1/sys/wrapping/lookup", json={"token": wrapping_token}
            ),
            login=True,
            token="",
        )
        created_at = str(info["data"]["creation_path"]).strip("/")
        if created_at != expected_path:
            raise LoginRefused(
                "vault.auth.secret_id_response_wrapping_path: the wrapped secret_id was created at"
                f" {quoted(created_at)}, not at the configured path; it is not unwrapped"
            )
        secret_id = str(
            self.nodes.call(
                "unwrap",
                "unwrap of the secret_id",
                lambda client: client.sys.unwrap()["data"]["secret_id"],
                write=True,
                login=True,
                token=wrapping_token,
            )
        )
        self._unwrapped = (digest, Sensitive(secret_id))
        log.info("unwrapped the secret_id from %s", auth.secret_id_file)
        return secret_id

    def _set_lease(self, seconds: float, renewable: bool) -> None:
        self.token_expires_at = time.time() + seconds if seconds > 0 else 0.0
        self._lease_seconds = seconds
        self._renewable = renewable and seconds > 0
        self._expires_at = self._clock() + seconds if seconds > 0 else None


def _read_credential(path: Path, key: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise SourceUnavailable(f"{key}: cannot read {path} ({exc.strerror})") from None
    if not value:
        raise SourceUnavailable(f"{key}: {path} is empty")
    return value


def _method(auth: VaultAuth) -> str:
    if isinstance(auth, JwtAuth):
        return auth.method
    return "approle" if isinstance(auth, AppRoleAuth) else "token"


def _static_token(auth: TokenAuth) -> str:
    if auth.token_file is not None:
        return _read_credential(auth.token_file, "vault.auth.token_file")
    if auth.env_token is not None:
        return auth.env_token.reveal()
    raise SourceUnavailable("vault.auth: no token configured")
