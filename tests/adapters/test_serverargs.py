"""The receiving agent's check of what a push asks its rsync daemon to do
(``mesh.adapters.rsync.serverargs``): the arguments themselves, and the prologue they
arrive in, however the stream is split. A push through the real tunnel is in
``tests/integration/test_tunnel.py``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.adapters.rsync import rsyncd
from mesh.adapters.rsync.serverargs import MAX_PROLOGUE, Prologue, check_server_args
from mesh.errors import RemoteProtocolError

KEEP = rsyncd.DEFAULT_KEEP_NAME
DEST = f"data/{KEEP}/in/p1/"
GOOD = ("-logtprIe.iLsfxCIvu", "--numeric-ids", "--copy-dest", "../../../")
GREETING = b"@RSYNCD: 32.0 sha512 sha256 sha1 md5 md4\n"


def server_args(*options: str, dest: str = DEST) -> list[str]:
    return ["--server", *options, ".", dest]


def check(args: list[str], keep: str = KEEP, push_id: str = "p1") -> str | None:
    return check_server_args(args, keep, push_id)


def test_accepts_what_our_client_sends() -> None:
    assert check(server_args(*GOOD)) is None
    assert check(server_args("-logtpre.iLsfxCIvu", "--copy-dest=../../../")) is None


@pytest.mark.parametrize(("keep", "push_id"), [(KEEP, ""), (KEEP, "../p1"), ("keep", "p1")])
def test_refuses_a_push_the_tunnel_did_not_name(keep: str, push_id: str) -> None:
    why = check(server_args(*GOOD, dest=f"data/{keep}/in/{push_id}/"), keep, push_id)
    assert why is not None and "did not name this push" in why


@pytest.mark.parametrize(
    ("options", "dest", "reason"),
    [
        (GOOD, "data/", "destination must be"),
        (GOOD, f"data/{KEEP}/in/p2/", "destination must be"),
        (GOOD, f"data/{KEEP}/in/p1", "destination must be"),
        (GOOD, f"data/{KEEP}/p1/", "destination must be"),
        (GOOD, f"data/{KEEP}/in/p1/sub/", "destination must be"),
        (GOOD, f"data//{KEEP}/in/p1/", "destination must be"),
        (GOOD, f"/{KEEP}/in/p1/", "destination must be"),
        (GOOD, f"data/./{KEEP}/in/p1/", "destination must be"),
        (GOOD, f"other/{KEEP}/in/p1/", "destination must be"),
        (("-logtpre.iLsfxCIvu",), DEST, "--copy-dest"),
        (("-logtpre.iLsfxCIvu", "--copy-dest", "../../"), DEST, "--copy-dest"),
        (("-logtpre.iLsfxCIvu", "--copy-dest", "/"), DEST, "--copy-dest"),
        ((*GOOD, "--copy-dest", "../../../"), DEST, "exactly one"),
        ((*GOOD, "--numeric-ids"), DEST, "more than once"),
        ((*GOOD, "--compare-dest", "../../../"), DEST, "not allowed"),
        ((*GOOD, "--link-dest", "../../../"), DEST, "not allowed"),
        ((*GOOD, "--delete"), DEST, "not allowed"),
        ((*GOOD, "--force"), DEST, "not allowed"),
        ((*GOOD, "--sender"), DEST, "not allowed"),
        ((*GOOD, "--backup-dir", f"/{KEEP}/p1"), DEST, "not allowed"),
        (("-blogtpre.iLsfxCIvu", *GOOD[1:]), DEST, "'b'"),
        (("-Klogtpre.iLsfxCIvu", *GOOD[1:]), DEST, "'K'"),
        (("-slogtpre.iLsfxCIvu", *GOOD[1:]), DEST, "'s'"),  # --secluded-args
        (("-logtpre.iLs/x", *GOOD[1:]), DEST, "capability"),
        ((*GOOD, "--inplace"), DEST, "not allowed"),
        ((*GOOD, "--temp-dir", "/tmp"), DEST, "not allowed"),
        ((*GOOD, "--partial-dir", "x"), DEST, "not allowed"),
        ((*GOOD, "-b"), DEST, "one short-option bundle"),
        ((*GOOD, "-"), DEST, "not allowed"),
        (GOOD[1:], DEST, "one short-option bundle"),
    ],
)
def test_refuses_anything_else(options: tuple[str, ...], dest: str, reason: str) -> None:
    why = check(server_args(*options, dest=dest))
    assert why is not None and reason in why


def test_refuses_what_is_not_a_server_request() -> None:
    assert "not an rsync server request" in (check(["--sender", *GOOD, ".", DEST]) or "")
    assert "no end of options" in (check(["--server", *GOOD, DEST]) or "")


# --- the prologue: greeting, module, arguments ------------------------------------------


def prologue_bytes(args: list[str], greeting: bytes = GREETING, module: bytes = b"data\n"
                   ) -> bytes:
    return greeting + module + b"".join(a.encode() + b"\0" for a in args) + b"\0"


# What rsync 3.5.0 sent through the tunnel, captured: the binary protocol follows at once.
OURS = prologue_bytes(server_args(*GOOD)) + b"\x1exxh128 xxh3 xxh64 md5 md4 sha1"


@given(st.lists(st.integers(1, len(OURS) - 1), unique=True).map(sorted))
def test_passes_our_prologue_whole_however_it_is_split(cuts: list[int]) -> None:
    """The greeting and the module go on as each is read (the client waits for the
    daemon's answer to each), the arguments only once all are in, and then the rest."""
    prologue = Prologue(KEEP, "p1")
    ends = [*cuts, len(OURS)]
    pieces = [OURS[a:b] for a, b in zip([0, *cuts], ends, strict=True)]
    lines_end = len(GREETING) + len(b"data\n")
    args_end = OURS.index(b"\0\0") + 2
    passed = b""
    for end, piece in zip(ends, pieces, strict=True):
        passed += prologue.feed(piece)
        if end < args_end:
            assert not prologue.done
            assert passed == OURS[:lines_end if end >= lines_end else
                                  len(GREETING) if end >= len(GREETING) else 0]
        else:
            assert prologue.done and passed == OURS[:end]


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (prologue_bytes(server_args(*GOOD), greeting=b"@RSYNCD: 29.0\n"), "protocol 29"),
        (prologue_bytes(server_args(*GOOD), greeting=b"@RSYNCD: x\n"), "greeting"),
        (prologue_bytes(server_args(*GOOD), greeting=b"HELLO\n"), "greeting"),
        (prologue_bytes(server_args(*GOOD), module=b"other\n"), "module"),
        (prologue_bytes(server_args(*GOOD), module=b"#early_input=5\n"), "module"),
        (prologue_bytes(server_args(*GOOD), module=b"da\rta\n"), "carriage return"),
        (prologue_bytes(server_args(*GOOD, dest=DEST + "\r")), "carriage return"),
        (prologue_bytes(server_args(*GOOD, "--del\nete")), "newline"),
        (prologue_bytes(server_args(*GOOD, dest=f"data/{KEEP}/in/p1/é")), "not ASCII"),
        (prologue_bytes(server_args(*GOOD, *["--numeric-ids"] * 20)), "more than 16"),
        (prologue_bytes(server_args(*GOOD, "--delete")), "not allowed"),
        (prologue_bytes(server_args(*GOOD, dest=f"data/{KEEP}/in/p2/")), "destination"),
    ],
)
def test_refuses_any_other_prologue(stream: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        Prologue(KEEP, "p1").feed(stream)


def test_refuses_a_prologue_that_does_not_end() -> None:
    prologue = Prologue(KEEP, "p1")
    assert prologue.feed(GREETING + b"data\n--server\0") == GREETING + b"data\n"
    with pytest.raises(RemoteProtocolError, match="no end of the server arguments"):
        prologue.feed(b"-" * MAX_PROLOGUE)
    with pytest.raises(RemoteProtocolError, match="no end of the server arguments"):
        Prologue(KEEP, "p1").feed(b"@" * (MAX_PROLOGUE + 1))
