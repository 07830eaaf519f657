"""The one path normalization."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.paths import MAX_NAME_BYTES, child, is_normalized, normalize, parent, reserved
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


@pytest.mark.parametrize(
    ("path", "why"),
    [(".mesh-keep", ".mesh-keep"), (".mesh-keep/objects/ab12", ".mesh-keep"),
     (".mesh-keep/in/n9-1-1/x", ".mesh-keep"), (".mesh-state/state.db", ".mesh-state"),
     (".f.txt.a1B2c3", "rsync temp"), ("dir/.f.txt.a1B2c3", "rsync temp"),
     (".x\n.abcdef", "rsync temp")],
)
def test_names_the_agent_keeps_are_reserved(path: str, why: str) -> None:
    found = reserved(path)
    assert found is not None and why in found


@pytest.mark.parametrize(
    "path", ["a/.mesh-keep", "mesh-keep", ".mesh-keeping", "dir/.f.txt.a1B2c", ".f.abcdef/x",
             "f.txt.abcdef", ".hidden"],
)
def test_other_names_are_not(path: str) -> None:
    assert reserved(path) is None


names = st.one_of(
    st.sampled_from(["", ".", "..", "a/b", "/", "a\x00", "\udcff", "x" * 256, "é" * 128,
                     "x" * 255, " ", "\n"]),
    st.text(min_size=1, max_size=300),
)


@given(st.one_of(st.just(""), paths, st.just("d/" * 2040 + "d")), names)
def test_a_child_is_what_normalize_makes_of_it(folder: str, name: str) -> None:
    """``child(folder, name)``: the same path as ``normalize`` makes, or the same
    refusal, whatever the name (the walk's short cut for names read from a folder)."""
    joined = f"{folder}/{name}" if folder else name
    try:
        expected: str | None = normalize(joined)
    except InvalidPath:
        expected = None
    try:
        got: str | None = child(folder, name)
    except InvalidPath:
        got = None
    assert got == expected
