"""A failing test prints its fixtures: they must not carry secret values or tokens."""

from __future__ import annotations

from tests.support import Vault


def test_vault_fixture_repr_shows_no_value_or_token(vault: Vault) -> None:
    vault.write("media-catalog/repr-check", value="value-that-must-not-print")

    text = repr(vault)

    assert "value-that-must-not-print" not in text
    assert vault.server.root_token not in text
    assert "media-catalog/repr-check" in text
