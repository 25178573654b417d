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

from broker.errors import SecretMissingInSource, SourceDenied, SourceUnavailable, WriteConflict

# KV v2 answers a failed check-and-set with 400 and this text.
_CAS_MISMATCH = "check-and-set parameter did not match"


@contextmanager
def translate_vault_errors(operation: str, timeout: float) -> Iterator[None]:
    """Run a Vault call; re-raise its failures as broker errors naming ``operation``."""
    try:
        yield
    except hvac.exceptions.InvalidPath:
        raise SecretMissingInSource(f"vault has no value for {operation}") from None
    except hvac.exceptions.Forbidden:
        raise SourceDenied(f"vault denied {operation}") from None
    except hvac.exceptions.VaultDown:
        raise SourceUnavailable(f"vault is sealed or down during {operation}") from None
    except hvac.exceptions.InvalidRequest as exc:
        if _CAS_MISMATCH in str(exc):
            raise WriteConflict(f"another writer changed the secret first ({operation})") from None
        raise SourceDenied(f"vault rejected {operation} as invalid") from None
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
