"""The state database's file: opening it (pragmas, the numbered schema files applied in
order, ``user_version`` recording the last), and its WAL checkpoints on a thread of their
own. ``mesh.store.index`` is what reads and writes it."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from mesh.errors import StoreError
from mesh.store import digests

LOG = logging.getLogger("mesh.store.index")


# Pages of WAL after which a commit checkpoints by itself: only a backstop for a
# checkpointer that cannot keep up (SQLite's default is 1,000).
_AUTOCHECKPOINT_PAGES = 16384


def connect(path: Path | str) -> sqlite3.Connection:
    """The state database at ``path`` (or ``:memory:``), its schema brought up to date."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        # 16 MiB of page cache (SQLite's default is 2 MiB): a manifest's entries
        # land all over the tables' B-trees, and each page missed is a read.
        db.execute("PRAGMA cache_size=-16384")
        # Schema 5's triggers keep the digests: the functions they call, and a
        # REPLACE's implicit delete firing its delete triggers (DESIGN §3)
        digests.register(db)
        db.execute("PRAGMA recursive_triggers=ON")
        try:
            _migrate(db)
        except StoreError:
            db.close()
            raise
        if str(path) != ":memory:":
            db.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES:d}")
    except sqlite3.Error as err:
        raise StoreError(f"open state database {path}: {err}") from err
    return db


IN_CHUNK = 8192  # paths per ``path IN (SELECT value FROM json_each(?))`` query


def in_chunks(paths: Iterable[str], size: int = IN_CHUNK) -> Iterator[tuple[list[str], str]]:
    """``paths``, each once, in chunks of ``size``: each chunk and its JSON array, the
    parameter of a ``json_each`` IN query (one statement per chunk, not a row per path)."""
    todo = list(dict.fromkeys(paths))
    for i in range(0, len(todo), size):
        chunk = todo[i:i + size]
        yield chunk, json.dumps(chunk)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection of its own to the state database at ``path``, for work in
    a thread (``check_same_thread`` off). By URI, quoted: a '?', '#' or '%' in a folder's
    name would otherwise be taken apart. Raises ``sqlite3.Error``."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                           check_same_thread=False)


def _schema_files() -> list[tuple[int, str]]:
    folder = resources.files("mesh.store") / "schema"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(int(name.split("_", 1)[0]), (folder / name).read_text()) for name in files]


def _statements(sql: str) -> Iterator[str]:
    """The statements of a schema file, whole (a trigger's body holds several)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending  # the last, its ';' left out


def _migrate(db: sqlite3.Connection) -> None:
    current = db.execute("PRAGMA user_version").fetchone()[0]
    files = _schema_files()
    if files and current > files[-1][0]:
        # A later release's tables and triggers: this one's writes would fail or leave
        # what they keep (the digests) behind its rows
        raise StoreError(f"the state database is at schema {current}, from a later "
                         f"release; this one knows schema {files[-1][0]} at most: run "
                         f"that release or a later one (a state database does not go "
                         f"back to an older release)")
    for number, sql in files:
        if number <= current:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number:d}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class Checkpointer:
    """WAL checkpoints on a thread and a connection of their own.

    SQLite checkpoints in the commit that crosses ``wal_autocheckpoint`` pages, and
    with ``synchronous=NORMAL`` a checkpoint fsyncs: measured 2-5 ms on an idle disk
    (18 of 5,000 one-entry commits over 2 ms; none with auto-checkpoints off), more
    on a busy one, and on the event loop's thread every manifest waited behind it.
    Commits ``nudge()``; this thread runs a PASSIVE checkpoint (it never waits for
    the writer) at most every ``interval`` seconds while nudged. The GIL is released
    while SQLite works."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._nudged = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint {path.name}",
                                        daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        self._nudged.set()

    def close(self) -> None:
        self._closing.set()
        self._nudged.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None)
        except sqlite3.Error as err:
            LOG.warning("checkpoints of %s: %s; SQLite checkpoints by itself", self.path, err)
            return
        try:
            while True:
                self._nudged.wait()
                if self._closing.is_set():
                    return
                self._nudged.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as err:
                    LOG.warning("checkpoint of %s: %s", self.path, err)
                self._closing.wait(self.interval)
        finally:
            db.close()
