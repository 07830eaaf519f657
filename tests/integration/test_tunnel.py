"""The rsync push tunnel with real TLS, real rsync and the real fixed daemon on 127.0.0.1:
what is staged, that the live tree is untouched, who is refused and with which line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mesh import pki
from mesh.adapters.rsync import push as rsync_push
from mesh.adapters.rsync import rsyncd
from mesh.adapters.rsync.push import PushHello, PushOrder, TunnelError, push
from mesh.adapters.rsync.tunnel import TunnelLimits, TunnelServer
from mesh.frames import encode_frame
from tests.integration.conftest import Pki, RecordingSink, until

pytestmark = pytest.mark.integration

SENDER, RECEIVER = "alpha", "bravo"
KEEP = rsyncd.DEFAULT_KEEP_NAME
TUNNEL_LOG = "mesh.adapters.rsync.tunnel"


@asynccontextmanager
async def receiver(
    cluster_pki: Pki, data: Path, sink: RecordingSink, creds: pki.NodeCredentials | None = None
) -> AsyncIterator[TunnelServer]:
    server = TunnelServer(
        creds or cluster_pki.creds(RECEIVER), "127.0.0.1", 0, data, data / KEEP, sink
    )
    async with server:
        yield server


def order(
    server: TunnelServer, push_id: str, paths: list[str], peer: str = RECEIVER
) -> PushOrder:
    """Push ``paths`` to ``server`` as ``push_id``, expecting it to be ``peer``."""
    host, port = server.address
    return PushOrder(peer, host, port, push_id, tuple(paths), b"announcement " + push_id.encode())


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


def staged(target: Path, push_id: str) -> Path:
    """Where push ``push_id`` lands on the receiver: its staging dir."""
    return target / KEEP / "in" / push_id


def snapshot(root: Path, skip: str = f"{KEEP}/in") -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``root`` but ``skip`` and what is in it: inode, mode, size and
    mtime, as ``lstat`` sees them (a link is not followed)."""
    tree: dict[str, tuple[int, int, int, int]] = {}
    for path in [root, *root.rglob("*")]:
        rel = path.relative_to(root).as_posix()
        if rel == skip or rel.startswith(skip + "/"):
            continue
        st = path.lstat()
        tree[rel] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return tree


# --- the fixed daemon's config -----------------------------------------------------------


def test_our_client_sends_what_the_check_accepts(tmp_path: Path) -> None:
    argv = rsyncd.client_argv(tmp_path, 4242, KEEP, "p1")
    assert argv[1:4] == ["-rlptgoI", "--numeric-ids", "--copy-dest=../../../"]
    assert argv[-1] == f"rsync://127.0.0.1:4242/data/{KEEP}/in/p1/"
    assert not any(a.startswith(("--rsh", "-e")) for a in argv)  # no remote shell
    assert not any(a.startswith(("--delete", "--force", "--backup", "-b")) for a in argv)


def test_daemon_config_lines() -> None:
    text = rsyncd.render_daemon_config(rsyncd.DaemonConfig(Path("/data"), KEEP))
    staging = f"/{KEEP}/in/%MESH_PUSH_ID%"
    assert f"filter = - {staging}/{KEEP}/*** + {staging} + {staging}/** - /**\n" in text
    assert ("refuse options = * !recursive !links !perms !times !group !owner !ignore-times"
            " !numeric-ids !copy-dest\n") in text
    assert "exec" not in text  # the arguments are checked on their way in (serverargs)


@pytest.mark.parametrize("option", ["--delete", "--backup", "--inplace", "--keep-dirlinks",
                                    "--temp-dir=/"])
def test_the_daemon_alone_refuses_what_the_agent_checks(tmp_path: Path, option: str) -> None:
    """The agent reads the arguments before its daemon does (serverargs); the daemon's
    own allow-list still refuses, run here with no agent in front of it."""
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"new")
    (target / "f").write_bytes(b"old")
    (target / KEEP).mkdir()
    rsyncd.make_staging_dir(target / KEEP, "p1")
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(rsyncd.render_daemon_config(
        rsyncd.DaemonConfig(target, KEEP, chroot=os.geteuid() == 0)))
    # A single-use daemon through a remote shell: what the tunnel starts, with no tunnel.
    daemon = " ".join(["/usr/bin/env", "MESH_PUSH_ID=p1", rsyncd.RSYNC, "--server", "--daemon",
                       f"--config={conf}", "."])
    argv = [rsyncd.RSYNC, "-rlptgoI", "--numeric-ids", "--copy-dest=../../../", option,
            f"--rsh={daemon}", f"{source}/", f"h::data/{KEEP}/in/p1/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "refuse" in done.stderr or "rejected" in done.stderr, done.stderr
    assert (target / "f").read_bytes() == b"old"
    assert list(staged(target, "p1").iterdir()) == []


# --- pushes ------------------------------------------------------------------------------


ODD_NAMES = ["with space.txt", "new\nline", "ünïcødé ✓.txt", "star*q?[b]", "back\\slash", "-dash"]


async def test_push_is_staged_byte_for_byte_and_the_live_tree_is_untouched(
    cluster_pki: Pki, tmp_path: Path
) -> None:
    source, target = make_dirs(tmp_path)
    for name in ODD_NAMES:
        (source / name).write_bytes(name.encode() * 3)
    (source / "empty").write_bytes(b"")
    (source / "dir" / "sub").mkdir(parents=True)
    (source / "dir" / "sub" / "deep.bin").write_bytes(os.urandom(300_000))
    (source / "dir").chmod(0o750)
    (source / "dir" / "sub").chmod(0o711)
    (source / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "run.sh").chmod(0o751)
    (source / "link").symlink_to("with space.txt")
    (source / "abs").symlink_to("/etc/passwd")  # stored as sent, never followed
    (source / "up").symlink_to("../../../../..")
    (source / "replaced").write_bytes(b"new content")
    (target / "replaced").write_bytes(b"the receiver's own edit")
    (target / "deleted").write_bytes(b"deleted at the source")
    (target / "held back").write_bytes(b"not in this push")  # missing at A, not allowed
    (target / "dir").mkdir()
    (target / "dir" / "sub").write_bytes(b"a file here, a folder at the sender")
    # A folder's mtime is kept when it is in another second than the staged folder's
    # creation: in the same second rsync (3.1.3+) takes the two for equal and leaves it.
    os.utime(source / "dir" / "sub", ns=(1_600_000_000_123_456_789,) * 2)
    os.utime(source / "dir", ns=(1_600_000_000_000_000_000,) * 2)
    sink = RecordingSink(target, watch=("replaced",))

    async with receiver(cluster_pki, target, sink) as server:
        before = snapshot(target)
        allowed = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
        returncode = await push(
            order(server, "first", [*allowed, "deleted"]), source, cluster_pki.creds(SENDER)
        )
        await until(lambda: len(sink.finished()) == 1, "the push to end")
        after = snapshot(target)

    assert returncode == 0
    # Nothing in the live tree was created, changed or removed, the keep area included
    # (its staging area aside).
    assert after == before
    stage = staged(target, "first")
    assert describe(stage, skip="") == describe(source)  # links as sent, modes kept
    assert "deleted" not in describe(stage, skip="")  # deletes are the agent's to apply
    for rel in ["dir", "dir/sub", "dir/sub/deep.bin", "run.sh"]:
        assert (stage / rel).stat().st_mtime_ns == (source / rel).stat().st_mtime_ns, rel
    assert str((stage / "abs").readlink()) == "/etc/passwd"
    assert not any(p.name.startswith(".") for p in stage.rglob("*"))  # no temp file left
    [record] = sink.pushes
    assert (record.peer, record.push_id, record.header) == (SENDER, "first", b"announcement first")
    assert record.seen == {"replaced": b"the receiver's own edit"}  # begin ran before any data
    assert record.returncode == 0


async def test_a_changed_big_file_is_staged_whole(cluster_pki: Pki, tmp_path: Path) -> None:
    """The live file is only the delta basis (--copy-dest): the staged file is the
    sender's, complete, and the live one keeps its inode and bytes."""
    source, target = make_dirs(tmp_path)
    base = os.urandom(3 << 20)
    (target / "big").write_bytes(base)
    cut = 1 << 20
    (source / "big").write_bytes(base[:cut] + os.urandom(1 << 16) + base[cut + (1 << 16) :])
    inode = (target / "big").stat().st_ino
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        assert await push(order(server, "big", ["big"]), source, cluster_pki.creds(SENDER)) == 0
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    assert (staged(target, "big") / "big").read_bytes() == (source / "big").read_bytes()
    assert (target / "big").read_bytes() == base
    assert (target / "big").stat().st_ino == inode


async def test_refused_push_changes_nothing(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"new")
    (target / "f").write_bytes(b"old")
    sink = RecordingSink(target)
    sink.refuse = "the index is busy"
    async with receiver(cluster_pki, target, sink) as server:
        # Refused before rsync starts: the push fails, saying why, and runs no rsync.
        with pytest.raises(TunnelError, match=r"^bravo refused push refused: the index is busy$"):
            await push(order(server, "refused", ["f"]), source, cluster_pki.creds(SENDER))
    assert (target / "f").read_bytes() == b"old"
    assert not staged(target, "refused").exists()
    assert sink.pushes == []


async def test_a_node_that_is_not_a_current_peer_cannot_push(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: any node with a certificate of the cluster pushed, peer or not."""
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"from a stranger")
    sink = RecordingSink(target)
    server = TunnelServer(cluster_pki.creds(RECEIVER), "127.0.0.1", 0, target, target / KEEP,
                          sink, peers=lambda node: node == "charlie")
    async with server:
        with pytest.raises(TunnelError, match="not a peer of this node"):
            await push(order(server, "stranger-1-1", ["f"]), source, cluster_pki.creds(SENDER))
        await until(lambda: bool(refusals(caplog)), "the refusal")
    assert sink.pushes == [] and not (target / "f").exists()
    assert not staged(target, "stranger-1-1").exists()
    [line] = refusals(caplog)
    assert line.startswith(f"tunnel: refused push from {SENDER} (127.0.0.1:")
    assert line.endswith("not a peer of this node (it links to no broker of that node)")


# --- a client that does not play along ---------------------------------------------------


async def raw_rsync(
    cluster_pki: Pki, server: TunnelServer, source: Path, push_id: str, *options: str,
    dest: str | None = None,
) -> tuple[int, str]:
    """Our rsync client through the real tunnel (``rsync_push.tunnelled``: header,
    go-ahead, the loopback listener the agent relays), but with the command line given
    here instead of ours (the destination: this push's staging dir unless ``dest`` says
    otherwise), as a hostile sender would run it."""
    path = rsyncd.staging_dest(KEEP, push_id) if dest is None else dest
    host = server.address[0]

    def argv(port: int) -> list[str]:
        return [rsyncd.RSYNC, "-rlptgo", *options, f"{source}/", rsyncd.daemon_url(port, path)]

    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    the_order = PushOrder(RECEIVER, host, server.address[1], push_id, (), b"raw")
    returncode, errors = await rsync_push.tunnelled(
        the_order, cluster_pki.creds(SENDER), argv, b"", env)
    return returncode, errors.decode()


def refused_in_log(caplog: pytest.LogCaptureFixture, push_id: str) -> bool:
    """The receiver logged its refusal of ``push_id``: the agent's, of the arguments its
    client sent (``serverargs``), or its daemon's."""
    lines = [r.getMessage() for r in caplog.records if r.name == TUNNEL_LOG]
    return any(line.startswith(f"tunnel: refused push {push_id} from {SENDER}: ")
               or (f"push {push_id}: rsync: " in line and "refuse" in line) for line in lines)


COPY = "--copy-dest=../../../"


async def test_client_cannot_choose_the_command_nor_the_destination(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"from a hostile client")
    (target / "f").write_bytes(b"precious")
    (target / KEEP / "in" / "other").mkdir(parents=True)
    sink = RecordingSink(target)
    refusals: dict[str, tuple[list[str], str | None]] = {
        "root": ([COPY], "/"),
        "otherpush": ([COPY], f"/{KEEP}/in/other/"),
        "keeparea": ([COPY], f"/{KEEP}/"),
        "nocopydest": ([], None),
        "otherbasis": (["--copy-dest=../../"], None),
        "linkdest": (["--link-dest=../../../"], None),  # rsync mixes no two *-dest
        "delete": ([COPY, "--delete"], None),
        "backup": ([COPY, "--backup"], None),
        "keepdirlinks": ([COPY, "-K"], None),
        "inplace": ([COPY, "--inplace"], None),
        "tempdir": ([COPY, "--temp-dir=/"], None),
    }
    async with receiver(cluster_pki, target, sink) as server:
        before = snapshot(target)
        for push_id, (options, dest) in refusals.items():
            returncode, _ = await raw_rsync(
                cluster_pki, server, source, push_id, *options, dest=dest)
            assert returncode != 0, push_id
            # The daemon refuses before its protocol starts, so the reason reaches the
            # receiver's log only; the client sees an exit status.
            await until(
                functools.partial(refused_in_log, caplog, push_id),
                f"the daemon's refusal of {push_id}",
            )
            staging = staged(target, push_id)
            assert list(staging.iterdir()) == [], push_id
        assert snapshot(target) == before
        assert list(staged(target, "other").iterdir()) == []
        # Asking for another program on the far side changes nothing (rsync sends no
        # command to a daemon; a client of its own could): the tunnel runs its own daemon,
        # which stages the push.
        marker = tmp_path / "ran"
        returncode, errors = await raw_rsync(
            cluster_pki, server, source, "othercmd", f"--rsync-path=touch {marker}; rsync", COPY,
        )  # fmt: skip
    assert returncode == 0, errors
    assert not marker.exists()
    assert (target / "f").read_bytes() == b"precious"
    assert (staged(target, "othercmd") / "f").read_bytes() == b"from a hostile client"
    assert [p.returncode != 0 for p in sink.pushes] == [True] * len(refusals) + [False]


async def test_client_cannot_write_into_the_keep_area(cluster_pki: Pki, tmp_path: Path) -> None:
    """Not the live one (test above), nor one inside its staging dir: that would also
    make the live keep area a delta basis for it."""
    source, target = make_dirs(tmp_path)
    (source / KEEP / "older").mkdir(parents=True)
    (source / KEEP / "older" / "f").write_bytes(b"forged")
    (source / KEEP / "planted").symlink_to("/")
    (source / "ok").write_bytes(b"fine")
    (target / KEEP / "older").mkdir(parents=True)
    (target / KEEP / "older" / "f").write_bytes(b"kept by an older push")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        paths = [f"{KEEP}/older/f", f"{KEEP}/planted", "ok"]
        await push(order(server, "forge", paths), source, cluster_pki.creds(SENDER))
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    assert (target / KEEP / "older" / "f").read_bytes() == b"kept by an older push"
    stage = staged(target, "forge")
    assert (stage / "ok").read_bytes() == b"fine"
    # rsync leaves the refused directory behind, empty (mode 0700), and nothing in it.
    assert [p.relative_to(stage).as_posix() for p in stage.rglob("*")] in (["ok"], [KEEP, "ok"])
    assert not any((stage / KEEP).rglob("*")) if (stage / KEEP).exists() else True


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


def accepted_sockets(port: int) -> int:
    """How many of this process's TCP sockets on ``port`` are connections (not the listener):
    our file descriptors matched to the kernel's table by inode."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            ours.add(str(fd.readlink()))
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        if local_port == port and state != "0A" and f"socket:[{inode}]" in ours:
            count += 1
    return count


async def test_a_connection_still_closing_at_stop_is_closed(
    cluster_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never answers the tunnel's TLS close (it stopped reading): the stop
    cancels that connection's handler while it waits for the answer, and the socket
    must be closed then, not left to the TLS shutdown's own timeout (30 s) or to the
    garbage collector (an unclosed socket, a ResourceWarning once the loop is gone)."""
    _, target = make_dirs(tmp_path)
    sink = RecordingSink(target)
    files = cluster_pki.files(SENDER)
    context = client_context(files.ca, files.cert, files.key)
    server = TunnelServer(cluster_pki.creds(RECEIVER), "127.0.0.1", 0, target, target / KEEP,
                          sink, limits=TunnelLimits(stop_timeout=0.2))

    def connect(address: tuple[str, int]) -> ssl.SSLSocket:
        client = context.wrap_socket(socket.create_connection(address, timeout=10))
        client.sendall(encode_frame({"v": 2, "push": "p", "header": b""}))  # refused
        return client  # and never read from again

    async with server:
        port = server.address[1]
        client = await asyncio.to_thread(connect, server.address)
        try:
            await until(lambda: len(refusals(caplog)) == 1, "the refusal")
            assert accepted_sockets(port) == 1
            await server.stop()
            await until(lambda: accepted_sockets(port) == 0, "the socket closed", within=5)
        finally:
            client.close()


def foreign_bravo(cluster_pki: Pki) -> pki.NodeCredentials:
    """bravo's credentials from another CA of a cluster of the same name."""
    return pki.NodeCredentials(
        pki.NodeIdentity("test", "bravo"),
        cluster_pki.foreign / pki.CA_CERT,
        cluster_pki.foreign / "bravo.crt",
        cluster_pki.foreign / "bravo.key",
    )


@pytest.mark.parametrize(
    ("expected", "foreign", "reason"),
    [
        ("charlie", False, "push wrong to charlie at 127.0.0.1:{port}: the certificate is "
                           "bravo's"),
        (RECEIVER, True, "push wrong to bravo at 127.0.0.1:{port}: certificate verify failed"),
    ],
    ids=["another node", "another CA"],
)
async def test_a_push_to_a_tunnel_that_is_not_the_peer_fails_with_one_line(
    cluster_pki: Pki, tmp_path: Path, expected: str, foreign: bool, reason: str
) -> None:
    """The sender checks who it reached before it sends the header: a tunnel whose
    certificate names another node, or comes from another CA, gets neither the
    announcement nor any data; the push fails with one line naming both ends."""
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"for the peer only")
    sink = RecordingSink(target)
    creds = foreign_bravo(cluster_pki) if foreign else None
    async with receiver(cluster_pki, target, sink, creds=creds) as server:
        port = server.address[1]
        with pytest.raises(TunnelError) as raised:
            await push(order(server, "wrong", ["f"], peer=expected), source,
                       cluster_pki.creds(SENDER))
    message = str(raised.value)
    assert message.startswith(reason.format(port=port)), message
    assert "\n" not in message
    assert sink.pushes == []
    assert not staged(target, "wrong").exists() and not (target / "f").exists()


async def test_reused_push_id_is_refused(cluster_pki: Pki, tmp_path: Path) -> None:
    source, target = make_dirs(tmp_path)
    (source / "f").write_bytes(b"one")
    sink = RecordingSink(target)
    async with receiver(cluster_pki, target, sink) as server:
        creds = cluster_pki.creds(SENDER)
        assert await push(order(server, "same", ["f"]), source, creds) == 0
        (source / "f").write_bytes(b"two")
        with pytest.raises(TunnelError, match="refused push same: staging dir: push id already"):
            await push(order(server, "same", ["f"]), source, creds)
    assert (staged(target, "same") / "f").read_bytes() == b"one"
    assert not (target / "f").exists()
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
                push(order(server, f"uv{i}", ["f"]), source, cluster_pki.creds(SENDER))
                for i in range(4)
            ))
            await until(lambda: len(sink.finished()) == 4, "the pushes to end")
        assert codes == [0, 0, 0, 0]
        for i in range(4):
            assert (staged(target, f"uv{i}") / "f").read_bytes() == (source / "f").read_bytes()

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
        code = await push(order(server, "same", ["plan"]), source, cluster_pki.creds(SENDER))
        await until(lambda: len(sink.finished()) == 1, "the push to end")
    assert code == 0
    assert (staged(target, "same") / "plan").read_bytes() == b"n1's plan"


def test_a_push_leaves_nothing_for_the_garbage_collector(cluster_pki: Pki, tmp_path: Path
                                                         ) -> None:
    """Each push's TLS buffers (a quarter MiB a side) must go when it ends, on both sides:
    the agent runs the collector rarely (mesh.engine.gcpolicy), so what is left in a
    cycle stays for minutes. On uvloop, as the agent runs."""
    import gc

    import uvloop

    async def pushes() -> list[str]:
        source, target = make_dirs(tmp_path)
        (source / "f").write_bytes(os.urandom(10_000))
        sink = RecordingSink(target)
        async with receiver(cluster_pki, target, sink) as server:
            assert await push(order(server, "warm", ["f"]), source,
                              cluster_pki.creds(SENDER)) == 0
            await until(lambda: len(sink.finished()) == 1, "the first push to end")
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                assert await push(order(server, "p1", ["f"]), source,
                                  cluster_pki.creds(SENDER)) == 0
                await until(lambda: len(sink.finished()) == 2, "the push to end")
                await asyncio.sleep(0)  # the transports' last callbacks
                gc.collect()
                left = sorted({type(o).__qualname__ for o in gc.garbage
                               if "SSL" in type(o).__qualname__ or type(o).__name__ == "End"})
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        return left

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(asyncio.wait_for(pushes(), 60)) == []
