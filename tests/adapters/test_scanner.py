"""The scanner on a real filesystem: kinds, walk, settledness, the stat cache."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.adapters.fs import scanner as scanner_mod
from mesh.adapters.fs.listing import default_ignore, stat_tree, tree
from mesh.adapters.fs.scanner import RETRIES, Scanner, Unsettled
from mesh.core.manifest import Kind
from mesh.core.paths import MAX_PATH_BYTES
from mesh.store.index import Index
from mesh.store.statcache import CachedStat, StatCache

NAMES = ["with space", "new\nline", "ünïcødé ✓", "日本語.txt", " lead", "trail "]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.005)


def settled_for(path: Path, seconds: float) -> Callable[[], bool]:
    """Whether ``path`` last changed (ctime) more than ``seconds`` ago."""
    return lambda: time.time_ns() - path.lstat().st_ctime_ns > seconds * 1e9


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return data


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the scanner's content hashes (one entry per file read)."""
    calls: list[int] = []
    real = scanner_mod.hash_fd

    def counting(fd: int) -> tuple[bytes, int]:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(scanner_mod, "hash_fd", counting)
    return calls


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(tmp_path / "state.db")
    yield idx
    idx.close()


@pytest.mark.parametrize(("rel", "ignored"), [
    (".mesh-keep", True), (".mesh-keep/a/b", True), (".mesh-state/index.db", True),
    ("d/.report.pdf.Ab12Z9", True), (".x.abcdef", True), (".a.b.c.123456", True),
    ("d/.mesh-keep", False), ("report.pdf", False), (".hidden", False),
    (".x.abcde", False), (".x.abcdefg", False), (".x.abc-12", False), ("x.abcdef", False),
    # The documented false positive: a hidden name with a six-letter suffix.
    (".config.backup", True),
    (".new\nline.abcdef", True), (".x.abcdef\n", False),
])
def test_default_ignore(rel: str, ignored: bool) -> None:
    assert default_ignore(rel) is ignored


def test_observe_file_dir_and_absence(root: Path) -> None:
    (root / "d").mkdir(mode=0o750)
    (root / "d").chmod(0o750)
    f = root / "d" / "f.txt"
    f.write_bytes(b"hello")
    f.chmod(0o640)
    s = Scanner(root)
    got = s.observe("d/f.txt")
    assert got is not None
    st = f.lstat()
    assert (got.kind, got.hash, got.size, got.mtime_ns, got.mode) == (
        Kind.FILE, sha(b"hello"), 5, st.st_mtime_ns, 0o640)
    d = s.observe("./d/")
    assert d is not None and (d.kind, d.hash, d.size, d.mode) == (Kind.DIR, b"", 0, 0o750)
    assert s.observe("missing") is None
    assert s.observe("d/f.txt/below") is None  # ENOTDIR is absence too
    f.chmod(0o4755)  # setuid, setgid and sticky are not synced (issue 13): no peer sets them
    got = s.observe("d/f.txt")
    assert got is not None and got.mode == 0o755


def test_empty_and_large_files_hash_like_hashlib(root: Path) -> None:
    data = os.urandom(3 * scanner_mod.CHUNK + 17)
    (root / "big").write_bytes(data)
    (root / "empty").write_bytes(b"")
    s = Scanner(root)
    big, empty = s.observe("big"), s.observe("empty")
    assert big is not None and big.hash == sha(data) and big.size == len(data)
    assert empty is not None and empty.hash == sha(b"") and empty.size == 0


def test_symlinks_are_not_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not ours")
    (root / "to-dir").symlink_to(outside)
    (root / "dangling").symlink_to("no/such/target")
    (root / "to-file").symlink_to(outside / "secret")
    s = Scanner(root)
    for name, target in [("to-dir", str(outside)), ("dangling", "no/such/target"),
                         ("to-file", str(outside / "secret"))]:
        got = s.observe(name)
        assert got is not None
        assert (got.kind, got.hash, got.mode) == (Kind.SYMLINK, sha(target.encode()), 0)
    assert s.observe("to-dir/secret") is None  # never through a symlink
    assert list(s.walk()) == ["dangling", "to-dir", "to-file"]


def test_fifos_and_sockets_are_absent_with_one_log_line(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        s = Scanner(root)
        with caplog.at_level(logging.INFO, logger="mesh.adapters.fs.scanner"):
            assert s.observe("fifo") is None  # and does not block opening it
            assert s.observe("sock") is None
    finally:
        sock.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "'fifo'" in lines[0] and "'sock'" in lines[1]


def test_walk_sorted_per_directory_with_dirs_and_odd_names(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in NAMES:
        (root / name).mkdir()
        (root / name / name).write_bytes(name.encode())
    (root / "b").mkdir()
    (root / "b" / "z").write_bytes(b"")
    (root / "b" / "a").write_bytes(b"")
    (root / ".mesh-keep" / "x").mkdir(parents=True)
    (root / ".mesh-keep" / "x" / "kept").write_bytes(b"")
    (root / ".mesh-state").mkdir()
    (root / "b" / ".z.Q1w2E3").write_bytes(b"rsync temp")
    bad = root / os.fsdecode(b"bad\xff\xfename")  # surrogate-escaped: the bytes on disk
    bad.mkdir()
    (bad / "inside").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mesh.adapters.fs.listing"):
        walked = list(Scanner(root).walk())
    expected = []
    for name in sorted([*NAMES, "b"]):
        expected.append(name)
        expected.extend(["b/a", "b/z"] if name == "b" else [f"{name}/{name}"])
    assert walked == expected
    assert [r.getMessage() for r in caplog.records] == [
        "skipping b'bad\\xff\\xfename' in '.': name is not valid UTF-8"]
    s = Scanner(root)
    for rel in walked:  # every walked name can be observed as is
        assert s.observe(rel) is not None


def test_a_path_longer_than_the_wire_allows_is_skipped_with_its_subtree(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Folders nested until a name of 255 bytes in the last would make a path past
    ``MAX_PATH_BYTES`` (the disk allows it, made relative to a folder): each walk lists
    every path that fits, skips that one with what is in it, and says why."""
    names = ["d" * 250] * 15 + ["e" * 120]
    fits = ["/".join(names[:i]) for i in range(1, len(names) + 1)]
    assert len(fits[-1]) + 1 + 255 > MAX_PATH_BYTES > len(str(root)) + 1 + len(fits[-1])
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.mkdir("f" * 255, dir_fd=fd)
        os.close(os.open("f" * 255 + "/file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    with caplog.at_level(logging.WARNING, logger="mesh.adapters.fs.listing"):
        assert [p for p, _ in tree(root, "", default_ignore)] == fits
        assert [p for p, _ in stat_tree(root, "", default_ignore)] == fits
        assert [p for p, _ in tree(root, "", default_ignore, folders_only=True)] == fits
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and all(f"path longer than {MAX_PATH_BYTES} bytes" in m
                                  for m in said), said


def test_the_folders_are_the_walk_s_folders_in_its_order(root: Path) -> None:
    """``tree`` with ``folders_only`` (what the watcher watches) lists no file's name,
    yet yields exactly the folders ``tree`` yields, in its order: odd, ignored,
    symlinked and not UTF-8 names included."""
    for name in [*NAMES, "b", "b/c", "b/c/d", "e", ".mesh-keep/x", ".mesh-state"]:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "file").write_bytes(b"")
    (root / "b" / "c" / "sub.txt").mkdir()  # a folder named like a file
    (root / "b" / "link").symlink_to(root / "e")
    (root / os.fsdecode(b"bad\xff")).mkdir()
    (root / "e" / ".z.Q1w2E3").mkdir()  # an rsync temp name
    walked = [rel for rel, is_dir in tree(root, "", default_ignore) if is_dir]
    assert "b/c/sub.txt" in walked and "b/link" not in walked
    assert [p for p, _ in tree(root, "", default_ignore, folders_only=True)] == walked
    assert [p for p, _ in tree(root, "b", default_ignore, folders_only=True)] == [
        "b/c", "b/c/d", "b/c/sub.txt"]


def test_the_stat_tree_is_the_walk_with_each_path_s_lstat(root: Path) -> None:
    """``stat_tree`` (the start-up walk's): ``tree``'s paths in its order, each with
    what ``lstat`` of its full name says; a symlink is stat'ed, not followed."""
    for name in [*NAMES, "b", "b/c", ".mesh-keep/x"]:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "file").write_bytes(name.encode())
    (root / "b" / "link").symlink_to(root / "b" / "c")
    walked = [rel for rel, _ in tree(root, "", default_ignore)]
    stated = list(stat_tree(root, "", default_ignore))
    assert [rel for rel, _ in stated] == walked
    for rel, st in stated:
        assert st is not None
        assert (st.st_ino, st.st_mode, st.st_size) == (
            os.lstat(root / rel).st_ino, os.lstat(root / rel).st_mode,
            os.lstat(root / rel).st_size)
    assert list(stat_tree(root, "b/link", default_ignore)) == []  # not listed through


def test_file_that_keeps_changing_is_unsettled(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = root / "log"
    f.write_bytes(b"x" * 1000)
    real = scanner_mod.hash_fd
    calls = 0

    def appending(fd: int) -> tuple[bytes, int]:
        nonlocal calls
        calls += 1
        with f.open("ab") as w:  # a writer appends while we read
            w.write(b"more")
        return real(fd)

    monkeypatch.setattr(scanner_mod, "hash_fd", appending)
    with pytest.raises(Unsettled) as err:
        Scanner(root).observe("log")
    assert err.value.path == "log" and calls == RETRIES


def test_file_changed_once_while_hashed_is_hashed_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = root / "doc"
    f.write_bytes(b"first version")
    real = scanner_mod.hash_fd
    calls = 0

    def rewrite_once(fd: int) -> tuple[bytes, int]:
        nonlocal calls
        calls += 1
        if calls == 1:  # same size: only mtime/ctime tell
            f.write_bytes(b"final version")
        return real(fd)

    monkeypatch.setattr(scanner_mod, "hash_fd", rewrite_once)
    got = Scanner(root).observe("doc")
    assert got is not None and got.hash == sha(b"final version") and calls == 2


def test_file_appended_by_a_writer_thread(root: Path) -> None:
    f = root / "growing"
    f.write_bytes(os.urandom(8 << 20))
    stop = threading.Event()

    def writer() -> None:
        chunk = os.urandom(64 << 10)
        with f.open("ab") as w:
            for _ in range(4000):  # bounded: 256 MiB at most
                if stop.is_set():
                    return
                w.write(chunk)
                w.flush()

    t = threading.Thread(target=writer)
    t.start()
    outcomes: list[str] = []
    try:
        for _ in range(5):
            try:
                got = Scanner(root).observe("growing")
            except Unsettled:
                outcomes.append("unsettled")
                continue
            assert got is not None
            with f.open("rb") as r:  # appends only: a settled hash is of a prefix
                assert sha(r.read(got.size)) == got.hash
            outcomes.append("hashed")
    finally:
        stop.set()
        t.join()
    assert len(outcomes) == 5
    got = Scanner(root).observe("growing")  # once the writer stopped it settles
    assert got is not None and got.hash == sha(f.read_bytes())


def test_stat_cache_spares_rehashing_unchanged_files(
    root: Path, index: Index, hash_calls: list[int]
) -> None:
    cache = StatCache(index.db)
    f = root / "f"
    f.write_bytes(b"one")
    wait_until(settled_for(f, 0.05))
    s = Scanner(root, cache=cache, racy_window=0.05)
    with index.batch():
        first = s.observe("f")
        again = s.observe("f")
    assert first == again and first is not None and len(hash_calls) == 1
    assert Scanner(root, cache=StatCache(index.db)).observe("f") == first  # persisted
    assert len(hash_calls) == 1

    f.write_bytes(b"two")  # same size, new content
    got = s.observe("f")
    assert got is not None and got.hash == sha(b"two") and len(hash_calls) == 2
    f.chmod(0o600)  # ctime moves: hashed again, new mode
    got = s.observe("f")
    assert got is not None and got.mode == 0o600 and len(hash_calls) == 3

    f.unlink()
    assert s.observe("f") is None and cache.get("f") is None


def test_recently_changed_files_are_not_cached(
    root: Path, index: Index, hash_calls: list[int]
) -> None:
    (root / "fresh").write_bytes(b"just written")
    s = Scanner(root, cache=StatCache(index.db), racy_window=60.0)
    s.observe("fresh")
    s.observe("fresh")
    assert len(hash_calls) == 2 and StatCache(index.db).get("fresh") is None


def test_stat_cache_joins_the_callers_transaction(root: Path, index: Index) -> None:
    cache = StatCache(index.db)
    f = root / "f"
    f.write_bytes(b"x")
    wait_until(settled_for(f, 0.01))
    s = Scanner(root, cache=cache, racy_window=0.01)
    with pytest.raises(RuntimeError), index.batch():
        s.observe("f")
        assert cache.get("f") is not None
        raise RuntimeError("the batch fails")
    assert cache.get("f") is None  # rolled back with the batch
    with index.batch():
        s.observe("f")
    assert Index(index.path or "").db.execute(  # committed: another connection sees it
        "SELECT count(*) FROM stat_cache").fetchone()[0] == 1


def test_stat_cache_rows(index: Index) -> None:
    cache = StatCache(index.db)
    high = (1 << 64) - 5  # overlayfs xino hands out inode numbers like this
    row = CachedStat(size=10, mtime_ns=-1, ctime_ns=2, ino=high, hash=b"h" * 32)
    cache.put_many([("a", row), ("b/c", row)])
    assert cache.get("a") == row and cache.get("b/c") == row and len(cache) == 2
    cache.delete("a")
    assert cache.get("a") is None and len(cache) == 1
    table = index.db.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'stat_cache'").fetchone()[0]
    assert "STRICT" in table and "WITHOUT ROWID" in table


def test_prehash_serves_one_observe_of_the_very_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.bin"
    first = os.urandom(scanner_mod.PREHASH_BYTES)
    big.write_bytes(first)
    (tmp_path / "small").write_bytes(b"x")
    s = Scanner(tmp_path)
    assert s.to_prehash(["big.bin", "small", "absent"]) == ["big.bin"]
    s.prehash(["big.bin"])
    hashed: list[int] = []
    real = scanner_mod.hash_fd

    def counting(fd: int) -> tuple[bytes, int]:
        hashed.append(fd)
        return real(fd)

    monkeypatch.setattr(scanner_mod, "hash_fd", counting)
    found = s.observe("big.bin")
    assert found is not None and found.hash == sha(first)
    assert hashed == []  # the worker's hash served
    # Used once: the next observe hashes again. And a file replaced since its prehash
    # (another inode) is hashed anew, never served the stale hash.
    s.prehash(["big.bin"])
    hashed.clear()
    second = os.urandom(scanner_mod.PREHASH_BYTES)
    tmp = tmp_path / "tmp"
    tmp.write_bytes(second)
    tmp.replace(big)
    found = s.observe("big.bin")
    assert found is not None and found.hash == sha(second)
    assert len(hashed) == 1


def _prepared(root: Path, name: str, data: bytes, mtime_ns: int) -> tuple[Path, os.stat_result]:
    """A file the agent prepares under a temp name: its content, an old mtime."""
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(data)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    return tmp, tmp.lstat()


def test_a_placed_file_is_not_hashed_again(
    root: Path, index: Index, hash_calls: list[int]
) -> None:
    """A file the data plane renamed into place is cached as it lies (the rename just
    changed its ctime): the scan the rename sets off reads a stat, no hash."""
    s = Scanner(root, cache=StatCache(index.db), racy_window=60.0)
    old = time.time_ns() - 3600 * 10**9
    tmp, prepared = _prepared(root, "f", b"placed", old)
    tmp.replace(root / "f")
    s.placed("f", prepared, sha(b"placed"))
    got = s.observe("f")
    assert got is not None and got.hash == sha(b"placed") and hash_calls == []

    # Written after the rename, even with the same size: the mtime moves, hashed again.
    (root / "f").write_bytes(b"edited")
    got = s.observe("f")
    assert got is not None and got.hash == sha(b"edited") and len(hash_calls) == 1


def test_a_placed_file_is_cached_only_when_it_is_the_file_prepared(
    root: Path, index: Index, hash_calls: list[int]
) -> None:
    cache = StatCache(index.db)
    s = Scanner(root, cache=cache, racy_window=60.0)
    # A recent mtime: a write in the same tick could leave the stat unchanged.
    tmp, prepared = _prepared(root, "recent", b"x", time.time_ns())
    tmp.replace(root / "recent")
    s.placed("recent", prepared, sha(b"x"))
    assert cache.get("recent") is None
    # Replaced by another file (another inode) before ``placed`` looked.
    old = time.time_ns() - 3600 * 10**9
    tmp, prepared = _prepared(root, "swapped", b"ours", old)
    tmp.replace(root / "swapped")
    other, _ = _prepared(root, "other", b"them", old)
    other.replace(root / "swapped")
    s.placed("swapped", prepared, sha(b"ours"))
    assert cache.get("swapped") is None
    got = s.observe("swapped")
    assert got is not None and got.hash == sha(b"them") and len(hash_calls) == 1
    # Gone, or under a symlinked folder: nothing cached, nothing raised.
    s.placed("absent", prepared, sha(b"ours"))
    (root / "link").symlink_to(root)
    s.placed("link/swapped", prepared, sha(b"ours"))
    assert cache.get("absent") is None and cache.get("link/swapped") is None
