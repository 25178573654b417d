"""The background task that keeps the broker's Vault token alive (see VaultSession)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.errors import BrokerError
from broker.sources.base import RunBlocking
from secretbroker.client import Backoff

log = logging.getLogger(__name__)

MIN_REFRESH_INTERVAL = 1.0
"""Seconds between two refreshes at least, so a token that cannot be extended (a non-renewable
dev token about to expire) is retried calmly instead of in a tight loop against Vault."""
RETRY_MAX = 30.0
RETRY_BACKOFF = Backoff(initial=1.0, maximum=RETRY_MAX)
"""Waits after failed refreshes: full jitter, so replicas that lost Vault together do not all
log in again in step when it returns."""


class RefreshableSession(Protocol):
    def seconds_until_renewal(self) -> float | None: ...

    def renew_or_login(self) -> None: ...


async def keep_token_fresh(
    session: RefreshableSession,
    run_blocking: RunBlocking,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    backoff: Backoff = RETRY_BACKOFF,
) -> None:
    """Log in at once, then renew or replace the token before expiry, backing off while Vault fails.

    Returns when the token never expires; runs until cancelled otherwise.
    """
    failures = 0
    first = True
    while True:
        delay = session.seconds_until_renewal()
        if delay is None:
            log.info("vault token does not expire; no renewal needed")
            return
        await sleep(0.0 if first else max(delay, MIN_REFRESH_INTERVAL))
        first = False
        try:
            await run_blocking(session.renew_or_login)
            failures = 0
        except BrokerError as exc:
            pause = backoff.delay(failures)
            log.warning("vault token refresh failed, retrying in %.1fs: %s", pause, exc)
            await sleep(pause)
            failures += 1
