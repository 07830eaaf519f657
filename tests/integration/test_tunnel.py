"""The rsync push tunnel with real TLS, real rsync and the real fixed daemon on 127.0.0.1:
what lands, what is kept, who is refused and with which line."""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mesh import pki
from mesh.adapters import rsyncd
from mesh.adapters.tunnel import PushHello, TunnelServer, credentials_env, encode_frame
from mesh.gate import TUNNEL_RSH, PushGrant, push, tunnel_env
from tests.integration.conftest import Pki, RecordingSink, until

pytestmark = pytest.mark.integration

SENDER, RECEIVER = "alpha", "bravo"
KEEP = rsyncd.DEFAULT_KEEP_NAME
TUNNEL_LOG = "mesh.adapters.tunnel"


@asynccontextmanager
async def receiver(
    cluster_pki: Pki, data: Path, sink: RecordingSink, creds: pki.NodeCredentials | None = None
) -> AsyncIterator[TunnelServer]:
    server = TunnelServer(
        creds or cluster_pki.creds(RECEIVER), "127.0.0.1", 0, data, data / KEEP, sink
    )
    async with server:
        yield server


def grant(server: TunnelServer, push_id: str, allowed: list[str]) -> PushGrant:
    host, port = server.address
    return PushGrant(RECEIVER, host, port, push_id, allowed, b"announcement " + push_id.encode())


def make_dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, target = tmp_path / "A", tmp_path / "B"
    source.mkdir()
    target.mkdir()
    return source, target


def describe(root: Path, skip: str = KEEP) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under ``root``: kind, permission bits, content or link target."""
    tree: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == skip or rel.startswith(skip + "/"):
            continue
        st = path.lstat()
        if path.is_symlink():
            tree[rel] = ("link", 0, str(path.readlink()))
        elif path.is_dir():
            tree[rel] = ("dir", st.st_mode & 0o7777, "")
        else:
            tree[rel] = ("file", st.st_mode & 0o7777, path.read_bytes())
    return tree


# --- the fixed daemon's argument check (pure) -----------------------------------------------


def server_args(*options: str, dest: str = "/") -> list[str]:
    return ["rsyncd", "--server", *options, ".", dest]


GOOD = ("-blogtprIe.iLsfxCIvu", "--backup-dir", f"/{KEEP}/p1", "--delete", "--numeric-ids")


def test_check_accepts_what_our_client_sends() -> None:
    assert rsyncd.check_server_args(server_args(*GOOD), KEEP, "p1") is None
    joined = ("-blogtpre.iLsfxCIvu", f"--backup-dir=/{KEEP}/p1", "--numeric-ids")
    assert rsyncd.check_server_args(server_args(*joined), KEEP, "p1") is None


@pytest.mark.parametrize(
    ("options", "dest", "reason"),
    [
        (("-logtpre.iLsfxCIvu", "--backup-dir", f"/{KEEP}/p1"), "/", "--backup is required"),
        (("-blogtpre.iLsfxCIvu",), "/", "--backup-dir"),
        (("-blogtpre.iLsfxCIvu", "--backup-dir", f"/{KEEP}/p2"), "/", "--backup-dir"),
        ((*GOOD, "--backup-dir", f"/{KEEP}/p1"), "/", "exactly one"),
        ((*GOOD, "--no-backup"), "/", "not allowed"),
        (("-bKlogtpre.iLsfxCIvu", "--backup-dir", f"/{KEEP}/p1"), "/", "'K'"),
        (("-sblogtpre.iLsfxCIvu", "--backup-dir", f"/{KEEP}/p1"), "/", "'s'"),
        ((*GOOD, "--inplace"), "/", "not allowed"),
        ((*GOOD, "--force"), "/", "not allowed"),
        (GOOD, "/sub/", "module root"),
        ((*GOOD, "-b"), "/", "one short-option bundle"),
    ],
)
def test_check_refuses_anything_else(options: tuple[str, ...], dest: str, reason: str) -> None:
    why = rsyncd.check_server_args(server_args(*options, dest=dest), KEEP, "p1")
    assert why is not None and reason in why


# --- pushes ------------------------------------------------------------------------------


ODD_NAMES = ["with space.txt", "new\nline", "ünïcødé ✓.txt", "star*q?[b]", "back\\slash", "-dash"]


@pytest.mark.parametrize("inline", [False, True], ids=["rsh", "inline"])
async def test_push_lands_byte_for_byte_and_keeps_what_it_displaces(
    cluster_pki: Pki, tmp_path: Path, inline: bool
) -> None:
    source, target = make_dirs(tmp_path)
    for name in ODD_NAMES:
        (source / name).write_bytes(name.encode() * 3)
    (source / "empty").write_bytes(b"")
    (source / "dir" / "sub").mkdir(parents=True)
    (source / "dir" / "sub" / "deep.bin").write_bytes(os.urandom(300_000))
    (source / "dir").chmod(0o750)
    (source / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "run.sh").chmod(0o751)
    (source / "link").symlink_to("with space.txt")
    (source / "abs").symlink_to("/etc/passwd")  # stored as sent, never followed
    (source / "replaced").write_bytes(b"new content")
    (target / "replaced").write_bytes(b"the receiver's own edit")
    (target / "deleted").write_bytes(b"deleted at the source")
    (target / "held back").write_bytes(b"not in this push")  # missing at A, not allowed
    before = describe(target)
    sink = RecordingSink(target, watch=("replaced",))

    async with receiver(cluster_pki, target, sink) as server:
        allowed = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
        returncode = await push(
            grant(server, "first", [*allowed, "deleted"]), source, cluster_pki.creds(SENDER),
            inline=inline,
        )
        await until(lambda: len(sink.finished()) == 1, "the push to end")

    assert returncode == 0
    expected = describe(source)
    landed = describe(target)
    assert {k: landed[k] for k in expected} == expected
    assert "deleted" not in landed
    assert landed["held back"] == before["held back"]
    deep = Path("dir", "sub", "deep.bin")
    assert (target / deep).stat().st_mtime == (source / deep).stat().st_mtime
    kept = target / KEEP / "first"
    assert (kept / "replaced").read_bytes() == b"the receiver's own edit"
    assert (kept / "deleted").read_bytes() == b"deleted at the source"
    assert sorted(p.name for p in kept.iterdir()) == ["deleted", "replaced"]
    [record] = sink.pushes
    assert (record.peer, record.push_id, record.header) == (SENDER, "first", b"announcement first")
    assert record.seen == {"replaced": b"the receiver's own edit"}  # begin ran before any data
    assert record.returncode == 0


async def test_replaced_directory_and_symlink_are_kept(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / "was-a-dir").write_bytes(b"now a file")
    (source / "was-a-link").write_bytes(b"now a file too")
    (target / "was-a-dir" / "inner").mkdir(parents=True)
    (target / "was-a-dir" / "inner" / "f").write_bytes(b"deep")
    (target / "was-a-link").symlink_to("/nowhere")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        # The sender names the entries it knew in the directory it replaced: a push removes
        # nothing else (test_push_deletes).
        paths = ["was-a-dir", "was-a-dir/inner", "was-a-dir/inner/f", "was-a-link"]
        assert await push(grant(server, "second", paths), source, cluster_pki.creds(SENDER)) == 0
    kept = target / KEEP / "second"
    assert (kept / "was-a-dir" / "inner" / "f").read_bytes() == b"deep"
    assert str((kept / "was-a-link").readlink()) == "/nowhere"
    assert (target / "was-a-dir").read_bytes() == b"now a file"


async def test_refused_push_changes_nothing(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"new")
    (target / "f").write_bytes(b"old")
    sink = RecordingSink(target)
    sink.refuse = "the index is busy"
    async with receiver(cluster_pki, target, sink) as server:
        returncode = await push(grant(server, "refused", ["f"]), source, cluster_pki.creds(SENDER))
    assert returncode != 0
    assert (target / "f").read_bytes() == b"old"
    assert not (target / KEEP / "refused").exists()
    assert sink.pushes == []


# --- a client that does not play along ---------------------------------------------------


async def raw_rsync(
    cluster_pki: Pki, server: TunnelServer, source: Path, push_id: str, *options: str
) -> tuple[int, str]:
    """Our rsync client, but with the command line given here instead of ours."""
    header = source.parent / f"{push_id}.header"
    header.write_bytes(b"raw")
    env = {"PATH": os.environ["PATH"]}
    env |= tunnel_env(grant(server, push_id, []), cluster_pki.creds(SENDER), header)
    rsh = rsyncd.rsh_command([sys.executable, *TUNNEL_RSH])
    proc = await asyncio.create_subprocess_exec(
        rsyncd.RSYNC, "-rlptgo", *options, f"--rsh={rsh}", f"{source}/",
        rsyncd.daemon_target(server.address[0]),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, errors = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, errors.decode()


def refused_in_log(caplog: pytest.LogCaptureFixture, push_id: str) -> bool:
    """The receiver logged its daemon's refusal of ``push_id``."""
    lines = (r.getMessage() for r in caplog.records if r.name == TUNNEL_LOG)
    return any(f"push {push_id}: rsync: " in line and "refuse" in line for line in lines)


async def test_client_cannot_choose_the_command_nor_skip_the_backup(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"from a hostile client")
    (target / "f").write_bytes(b"precious")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        refusals = {
            "nobackup": ["--delete"],
            "otherdir": ["--backup-dir", f"/{KEEP}/someone-else"],
            "keepdirlinks": ["-K", "--backup-dir", f"/{KEEP}/keepdirlinks"],
            "inplace": ["--inplace", "--backup-dir", f"/{KEEP}/inplace"],
        }
        for push_id, options in refusals.items():
            returncode, _ = await raw_rsync(cluster_pki, server, source, push_id, *options)
            assert returncode != 0, push_id
            assert (target / "f").read_bytes() == b"precious", push_id
            # The daemon refuses before its protocol starts, so the reason reaches the
            # receiver's log only; the client sees an exit status.
            await until(
                functools.partial(refused_in_log, caplog, push_id),
                f"the daemon's refusal of {push_id}",
            )
        # Asking the remote shell for another program changes nothing: the tunnel runs its
        # own daemon, which keeps what it replaces.
        marker = tmp_path / "ran"
        returncode, errors = await raw_rsync(
            cluster_pki, server, source, "othercmd",
            f"--rsync-path=touch {marker}; rsync", "--backup-dir", f"/{KEEP}/othercmd",
        )  # fmt: skip
    assert returncode == 0, errors
    assert not marker.exists()
    assert (target / "f").read_bytes() == b"from a hostile client"
    assert (target / KEEP / "othercmd" / "f").read_bytes() == b"precious"
    assert [p.returncode != 0 for p in sink.pushes] == [True] * 4 + [False]


async def test_client_cannot_write_into_the_keep_area(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / KEEP / "older").mkdir(parents=True)
    (source / KEEP / "older" / "f").write_bytes(b"forged")
    (source / KEEP / "planted").symlink_to("/")
    (target / KEEP / "older").mkdir(parents=True)
    (target / KEEP / "older" / "f").write_bytes(b"kept by an older push")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        paths = [f"{KEEP}/older/f", f"{KEEP}/planted"]
        await push(grant(server, "forge", paths), source, cluster_pki.creds(SENDER))
    assert (target / KEEP / "older" / "f").read_bytes() == b"kept by an older push"
    assert not (target / KEEP / "planted").is_symlink()


# --- TLS and the header --------------------------------------------------------------------


async def tls_client(server: TunnelServer, context: ssl.SSLContext) -> None:
    """Connect, send a valid header, and read until the server hangs up."""
    try:
        reader, writer = await asyncio.open_connection(*server.address, ssl=context)
        writer.write(PushHello("x", b"").encode())
        await writer.drain()
        await reader.read()
        writer.close()
    except (OSError, ssl.SSLError):
        pass


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TUNNEL_LOG and "refused" in r.msg]


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [(None, "did not return a certificate"), ("bravo", "certificate verify failed")],
    ids=["no certificate", "another CA"],
)
async def test_client_without_a_cluster_certificate_is_refused(
    cluster_pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    foreign: str | None,
    reason: str,
) -> None:
    _, target = make_dirs(tmp_path)
    sink = RecordingSink(target)
    files = cluster_pki.files(foreign, foreign=True)
    async with receiver(cluster_pki, target, sink) as server:
        await tls_client(server, client_context(files.ca, files.cert, files.key))
        await until(lambda: bool(refusals(caplog)), "a refusal log line")
    [line] = refusals(caplog)
    assert line.startswith("tunnel: refused 127.0.0.1:") and reason in line, line
    assert sink.pushes == []


async def test_malformed_header_is_refused_naming_the_peer(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, target = make_dirs(tmp_path)
    sink = RecordingSink(target)
    files = cluster_pki.files(SENDER)
    context = client_context(files.ca, files.cert, files.key)
    bad = [
        encode_frame({"v": 1, "push": "../etc", "header": b""}),
        encode_frame({"v": 2, "push": "p", "header": b""}),
        encode_frame({"v": 1, "push": "p", "header": "text", "more": 1}),
        (1 << 30).to_bytes(4, "big"),  # a 1 GiB frame: refused before it is read
        b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",  # not msgpack
    ]
    async with receiver(cluster_pki, target, sink) as server:
        for frame in bad:
            reader, writer = await asyncio.open_connection(*server.address, ssl=context)
            writer.write(frame)
            await writer.drain()
            await reader.read()
            writer.close()
        await until(lambda: len(refusals(caplog)) == len(bad), "one refusal per header")
    expected = f"tunnel: refused {SENDER}: push header"
    assert all(line.startswith(expected) for line in refusals(caplog))
    assert sink.pushes == []


async def run_tunnel_rsh(
    cluster_pki: Pki, server: TunnelServer, sender: str, expected_peer: str
) -> tuple[int, list[str]]:
    header = server.data_dir.parent / "header"
    header.write_bytes(b"h")
    host, port = server.address
    env = {
        "PATH": os.environ["PATH"],
        "MESH_PUSH_PEER": expected_peer,
        "MESH_PUSH_PORT": str(port),
        "MESH_PUSH_ID": "rsh",
        "MESH_PUSH_HEADER_FILE": str(header),
        **credentials_env(cluster_pki.creds(sender)),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *TUNNEL_RSH, host, "rsync", "--server", "--daemon", ".",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, errors = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, errors.decode().splitlines()


async def test_tunnel_rsh_fails_with_one_line(cluster_pki: Pki, tmp_path: Path) -> None:
    _, target = make_dirs(tmp_path)
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        returncode, lines = await run_tunnel_rsh(cluster_pki, server, SENDER, "charlie")
    assert returncode == 255
    assert len(lines) == 1 and "is bravo, not the expected peer charlie" in lines[0], lines
    foreign = pki.NodeCredentials(
        pki.NodeIdentity("test", "bravo"),
        cluster_pki.foreign / pki.CA_CERT,
        cluster_pki.foreign / "bravo.crt",
        cluster_pki.foreign / "bravo.key",
    )
    async with receiver(cluster_pki, target, sink, creds=foreign) as server:
        returncode, lines = await run_tunnel_rsh(cluster_pki, server, SENDER, RECEIVER)
    assert returncode == 255
    assert len(lines) == 1 and "certificate verify failed" in lines[0], lines
    assert sink.pushes == []


async def test_reused_push_id_is_refused(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"one")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        creds = cluster_pki.creds(SENDER)
        assert await push(grant(server, "same", ["f"]), source, creds) == 0
        (source / "f").write_bytes(b"two")
        assert await push(grant(server, "same", ["f"]), source, creds) != 0
    assert (target / "f").read_bytes() == b"one"
    assert len(sink.pushes) == 1


def test_pushes_work_under_uvloop(cluster_pki: Pki, tmp_path: Path) -> None:
    """The agent runs on uvloop; upgrading an accepted stream with start_tls hung there
    (the client's first handshake bytes were read before the upgrade). Several pushes at
    once, as lsyncd's syncs to several peers make them."""
    import uvloop

    async def pushes() -> None:
        source, target = make_dirs(tmp_path)
        (source / "f").write_bytes(os.urandom(10_000))
        sink = RecordingSink(target)
        async with receiver(cluster_pki, target, sink) as server:
            codes = await asyncio.gather(*(
                push(grant(server, f"uv{i}", ["f"]), source, cluster_pki.creds(SENDER))
                for i in range(4)
            ))
            await until(lambda: len(sink.finished()) == 4, "the pushes to end")
        assert codes == [0, 0, 0, 0]
        assert (target / "f").read_bytes() == (source / "f").read_bytes()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(pushes(), 60))


async def test_same_size_same_mtime_change_still_moves(cluster_pki: Pki, tmp_path: Path) -> None:
    """Two versions of one size written in the same second: rsync's quick check would
    call them equal. Every pushed path is one the gate decided the peer lacks."""
    source, target = make_dirs(tmp_path)
    (source / "plan").write_bytes(b"n1's plan")
    (target / "plan").write_bytes(b"n2's plan")
    for side in (source, target):
        os.utime(side / "plan", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        code = await push(grant(server, "same", ["plan"]), source, cluster_pki.creds(SENDER))
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    assert code == 0
    assert (target / "plan").read_bytes() == b"n1's plan"
