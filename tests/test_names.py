"""Secret name validation never echoes the caller's input."""

from __future__ import annotations

import pytest

from broker.errors import InvalidSecretName
from broker.names import validate_secret_name


@pytest.mark.parametrize("name", ["media-catalog/api", "a", "a/b/c", "x" * 256, "a..b/c"])
def test_well_formed_names_pass(name: str) -> None:
    validate_secret_name(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 257, "é" * 129, "../etc", "a/..", "/a", "a\tb", "a\x7fb", "a/", "a//b"]
)
def test_malformed_names_raise_without_echoing_the_name(name: str) -> None:
    with pytest.raises(InvalidSecretName) as caught:
        validate_secret_name(name)
    assert name not in str(caught.value) or name == ""
