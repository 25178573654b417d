"""The broker's own errors.

Every failure the broker can report to a caller is one of these. They are raised
by the parts (names, policy, sources, cache) and turned into gRPC status codes in
exactly one table, ``broker.api.status.STATUS_BY_ERROR``. Foreign exceptions
(hvac, requests) are translated into them in exactly one place, the Vault source.

Messages name what is wrong and never carry a secret value, a token or the
caller's raw input::

    BrokerError
    ├── InvalidRequest          a request argument is malformed (a category, a version)
    │   └── InvalidSecretName   the requested name is malformed
    ├── AccessDenied            the caller may not read the name
    ├── SecretNotDeclared       the broker's config does not declare the name
    ├── SecretMissingInSource   declared, but the source has no value at its path
    ├── SourceUnavailable       the source cannot be reached, is sealed or too slow
    ├── AuditUnavailable        the audit trail cannot be written and audit is fail-closed
    ├── LimitExceeded           the caller is past one of the broker's limits
    ├── StateUnavailable        the broker's own state (the rollback override) cannot be saved
    ├── SourceDenied            the source refused the broker itself (its Vault policy)
    ├── VersionOutOfRange       the requested version is not among those kept readable
    ├── NotApplicable           the operation does not apply to the secret as it is served
    └── WriteConflict           another writer changed the secret first (check-and-set)
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker reports."""


class InvalidRequest(BrokerError):
    """A request argument is malformed."""


class InvalidSecretName(InvalidRequest):
    """The requested name is malformed."""


class AccessDenied(BrokerError):
    """The caller's identity may not read the name."""


class SecretNotDeclared(BrokerError):
    """The broker serves only the secrets its config declares."""


class SecretMissingInSource(BrokerError):
    """The secret is declared but its source holds no value for it."""


class SourceUnavailable(BrokerError):
    """The source cannot answer now: unreachable, sealed, too slow or not logged in."""


class ShuttingDown(BrokerError):
    """This replica stops taking calls: the caller retries, or resumes a stream, on another."""


class LoginRefused(SourceUnavailable):
    """Vault answers but refuses the broker's own login (its credential, its role, or a
    wrapping token): Vault's secrets are out of reach until that is fixed, so cached values
    are served within max_stale, as for any outage. Never the caller's fault."""


class SourceDenied(BrokerError):
    """The source refused the broker's own credentials for this read."""


class VersionOutOfRange(BrokerError):
    """The requested version is not among the versions kept readable."""


class NotApplicable(BrokerError):
    """The operation does not apply: e.g. rotating or versioning a secret served from env."""


class WriteConflict(BrokerError):
    """Check-and-set failed: another writer wrote a new version first."""


class AuditUnavailable(BrokerError):
    """The audit trail cannot be written, and the config makes audit fail-closed."""


class StateUnavailable(BrokerError):
    """The broker cannot save its own state (the rollback override file); nothing changed."""


class LimitExceeded(BrokerError):
    """The caller is past one of the broker's configured limits; the message names it."""


class ConfigError(Exception):
    """The config is invalid. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
