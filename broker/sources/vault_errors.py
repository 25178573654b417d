"""The one border where hvac and requests exceptions become broker errors.

hvac raises for HTTP status codes, requests for the transport. Neither message is
passed on: Vault's error text can echo request data, so each translation states
the operation and what went wrong in our own words.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import hvac.exceptions
import requests

from broker.errors import (
    LoginRefused,
    SecretMissingInSource,
    SourceDenied,
    SourceUnavailable,
    WriteConflict,
)

# KV v2 answers a failed check-and-set with 400 and this text.
_CAS_MISMATCH = "check-and-set parameter did not match"

# Why Vault refused a login, in our words: its own text is never passed on (it may quote the
# request), but an operator needs to know which part of the credential to fix.
_LOGIN_REFUSALS = (
    (
        "wrapping token",
        "the wrapping token is used up or expired; if nobody here unwrapped it, it may have been"
        " intercepted: revoke that secret_id and deliver a new wrapped one",
    ),
    ("audience", "the token's audience is not one the role accepts"),
    ("signature", "the token's signature does not verify with the keys Vault trusts for it"),
    ("expired", "the token has expired"),
    ("not yet valid", "the token is not valid yet"),
    ("sub", "the token's subject is not the role's bound subject"),
    ("claim", "a claim of the token does not match the role's bound claims"),
    ("issuer", "the token's issuer is not the one Vault expects"),
    ("role", "the role does not exist or does not accept this credential"),
    ("secret id", "the secret_id is wrong, expired or used up"),
    ("secret_id", "the secret_id is wrong, expired or used up"),
)


def _login_refusal(exc: hvac.exceptions.VaultError) -> str:
    text = str(exc).lower()
    for phrase, reason in _LOGIN_REFUSALS:
        if phrase in text:
            return f": {reason}"
    return ""


@contextmanager
def translate_vault_errors(
    operation: str, timeout: float, *, login: bool = False
) -> Iterator[None]:
    """Run a Vault call; re-raise its failures as broker errors naming ``operation``. For a
    ``login``, a refusal says which part of the credential Vault found wrong."""
    try:
        yield
    except hvac.exceptions.InvalidPath:
        raise SecretMissingInSource(f"vault has no value for {operation}") from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
        if login:
            raise LoginRefused(f"vault refused the {operation}{_login_refusal(exc)}") from None
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            if _CAS_MISMATCH in str(exc):
                raise WriteConflict(
                    f"another writer changed the secret first ({operation})"
                ) from None
            raise SourceDenied(f"vault rejected {operation} as invalid") from None
        raise SourceDenied(f"vault denied {operation}") from None
    except hvac.exceptions.VaultDown:
        raise SourceUnavailable(f"vault is sealed or down during {operation}") from None
    except hvac.exceptions.VaultError as exc:
        raise SourceUnavailable(f"vault failed {operation} ({type(exc).__name__})") from None
    except requests.Timeout:
        raise SourceUnavailable(f"vault did not answer {operation} within {timeout:g}s") from None
    except requests.ConnectionError:
        raise SourceUnavailable(f"cannot connect to vault for {operation}") from None
    except requests.RequestException as exc:
        raise SourceUnavailable(
            f"vault transport failed {operation} ({type(exc).__name__})"
        ) from None
    except (KeyError, TypeError, ValueError):
        raise SourceUnavailable(f"vault sent an unexpected response to {operation}") from None
