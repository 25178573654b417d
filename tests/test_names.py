"""Secret name validation never echoes the caller's input."""

from __future__ import annotations

import pytest

from broker.errors import InvalidSecretName
from broker.names import quoted, quoted_list, validate_secret_name


@pytest.mark.parametrize(
    "name",
    ["media-catalog/api", "a", "a/b/c", "x" * 256, "a..b/c", "médias/été", "a b", "a\u00a0b"],
)
def test_well_formed_names_pass(name: str) -> None:
    validate_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        *["", "x" * 257, "é" * 129, "../etc", "a/..", "/a", "a\tb", "a\x7fb", "a/", "a//b"],
        *["a\x85b", "a\x9bb", "a\u2028b", "a\u2029b", "a\u202eb", "a\u200bb", "a\ufeffb"],
        # a surrogate, a private-use, a tag and an unassigned code point
        *["a\ud800b", "a\ue000b", "a\U000e0001b", "a\u0378b"],
    ],
)
def test_malformed_names_raise_without_echoing_the_name(name: str) -> None:
    with pytest.raises(InvalidSecretName) as caught:
        validate_secret_name(name)
    assert name not in str(caught.value) or name == ""


def test_quoted_caller_input_is_escaped_and_clipped() -> None:
    hostile = "x\n\u202e\x1b[31m" + "y" * 1000

    text = quoted(hostile)

    assert text.isprintable()
    assert len(text) < 100
    assert "(1008 characters)" in text
    assert quoted_list([f"c{i}" for i in range(10_000)]) == "'c0', 'c1', 'c2' and 9997 more"
