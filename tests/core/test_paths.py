"""The one path normalization."""

from __future__ import annotations

import pytest
from hypothesis import given

from mesh.core.paths import MAX_NAME_BYTES, is_normalized, normalize, parent
from mesh.errors import InvalidPath
from tests.core.strategies import paths


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("a", "a"), ("./a/b", "a/b"), ("a//b/", "a/b"), ("dir/ü ñ.txt", "dir/ü ñ.txt"),
     ("a\nb", "a\nb"), ("a/./b", "a/b")],
)
def test_accepts_and_folds(raw: str, clean: str) -> None:
    assert normalize(raw) == clean


@pytest.mark.parametrize(
    "bad",
    ["", "/", "/etc/passwd", "../x", "a/../../b", "a/..", "a\x00b", ".", "./",
     "x" * (MAX_NAME_BYTES + 1), "a/" * 3000, "\udcff"],
)
def test_refuses(bad: str) -> None:
    with pytest.raises(InvalidPath):
        normalize(bad)
    assert not is_normalized(bad)


def test_refuses_non_text() -> None:
    with pytest.raises(InvalidPath):
        normalize(b"a")  # type: ignore[arg-type]


def test_unicode_is_kept_as_given() -> None:
    nfc, nfd = "\u00e9", "e\u0301"
    assert normalize(nfc) != normalize(nfd)


@given(paths)
def test_normalize_is_idempotent(p: str) -> None:
    once = normalize(p)
    assert normalize(once) == once
    assert is_normalized(once)


def test_parent() -> None:
    assert parent("a/b/c") == "a/b"
    assert parent("a") is None
