"""``mesh versions`` and ``mesh restore`` on the agent's side (issue 14): the kept
versions of a path, the deleted paths that can still be brought back, and writing one
back as a new local edit.

Control socket ops (``mesh.engine.ops.control``): ``versions`` ``{path}`` or ``{deleted: true,
since_ms}``, and ``restore_version`` ``{path, version}``. A version is named by its
content hash (the command shows 12 hex digits; any unique prefix of 4 or more
names it): the same on every node that kept it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.adapters.fs.scanner import ScanError
from mesh.clock import now_ms
from mesh.core.manifest import Kind
from mesh.core.paths import normalize, reserved
from mesh.engine.dataplane import DataPlane
from mesh.engine.ops.control import ControlError, entry_doc, when
from mesh.errors import MeshError, RemoteProtocolError
from mesh.store.kept import KeptRow

LOG = logging.getLogger("mesh.engine.ops.control")


def version_doc(row: KeptRow, held: bool) -> dict[str, Any]:
    e = row.entry
    assert e.hash is not None
    return {**entry_doc(e), "id": e.hash.hex()[:12], "path": row.path,
            "reason": row.reason.value, "kept_ms": row.kept_ms, "kept": when(row.kept_ms),
            "held": held}


class VersionOps:
    """The handlers this module adds to the control socket."""

    def __init__(self, me: str, data: DataPlane) -> None:
        self.me = me
        self.data = data
        self.index = data.index
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "versions": self.versions, "restore_version": self.restore}

    def _now(self, path: str) -> dict[str, Any] | None:
        disk = self.index.state(path).disk
        return None if disk is None else entry_doc(disk.winner)

    async def versions(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("deleted") is True:
            since = args.get("since_ms")
            if since is not None and type(since) is not int:
                raise RemoteProtocolError("since_ms must be int")
            out = []
            for row in self.data.kept.latest_per_path(since):
                disk = self.index.state(row.path).disk
                if disk is not None and disk.content is not None:
                    continue  # there now: not a deleted path
                out.append({**version_doc(row, self._held(row)),
                            "deleted_by": None if disk is None else disk.winner.writer,
                            "deleted": None if disk is None
                            else entry_doc(disk.winner)["written"]})
            return {"node": self.me, "deleted": out}
        path = _path(args)
        rows = self.data.kept.of_path(path)
        return {"node": self.me, "path": path, "now": self._now(path),
                "versions": [version_doc(r, self._held(r)) for r in rows]}

    def _held(self, row: KeptRow) -> bool:
        content = row.entry.content
        return content is not None and self.data.keep.has(content)

    async def restore(self, args: dict[str, Any]) -> dict[str, Any]:
        """Write a kept version of ``path`` back as a new local edit: it is made on top
        of what this node holds, so it wins and syncs to every node."""
        path = _path(args)
        ref = args.get("version")
        if ref is not None and (type(ref) is not str or len(ref) < 4):
            raise ControlError("--version takes a version id: 4 or more hex digits")
        row = self._pick(path, ref)
        e = row.entry
        content = e.content
        assert content is not None and e.hash is not None
        if not self.data.keep.has(content):
            raise ControlError(f"version {e.hash.hex()[:12]} of {path} is listed but its "
                               f"content is no longer in {self.me}'s keep area")
        try:
            current = self.data.scanner.observe(path)
            if current is not None and current.content == content:
                return {"path": path, "id": e.hash.hex()[:12], "changed": False}
            if current is not None and current.kind is Kind.DIR:
                raise ControlError(f"{path} is a directory now: move it away first")
            self.data.write_back(path, e.kind, content, e.mode, path, replacing=current)
        except ScanError as err:
            raise ControlError(f"restore {path}: {err}") from err
        except (OSError, MeshError) as err:
            if isinstance(err, ControlError):
                raise
            raise ControlError(f"restore {path}: {err}") from err
        await self.data.scan([path])
        disk = self.index.state(path).disk
        LOG.info("operator restored version %s of %s (kept %s, %s) as a new local edit",
                 e.hash.hex()[:12], path, when(row.kept_ms), row.reason.value)
        return {"path": path, "id": e.hash.hex()[:12], "changed": True,
                "vector": None if disk is None else disk.vector.to_dict(),
                "written": when(now_ms())}

    def _pick(self, path: str, ref: str | None) -> KeptRow:
        rows = self.data.kept.of_path(path)
        if not rows:
            raise ControlError(f"{self.me} keeps no version of {path} (`mesh versions "
                               "--deleted` lists the deleted paths it can bring back)")
        if ref is None:
            return rows[0]
        ref = ref.lower()
        hits = {r.entry.hash: r for r in rows
                if r.entry.hash is not None and r.entry.hash.hex().startswith(ref)}
        if not hits:
            raise ControlError(f"no version {ref!r} of {path} on {self.me} "
                               f"(`mesh versions {path}` lists them)")
        if len(hits) > 1:
            raise ControlError(f"version id {ref!r} is ambiguous for {path}: "
                               f"{len(hits)} match")
        return next(iter(hits.values()))


def _path(args: dict[str, Any]) -> str:
    path = args.get("path")
    if type(path) is not str:
        raise RemoteProtocolError("path must be str")
    try:
        path = normalize(path.lstrip("/"))
    except MeshError as err:
        raise ControlError(f"{path!r} is not a path inside the data folder: {err}") from None
    why = reserved(path)
    if why is not None:
        raise ControlError(f"{path!r} has no versions: {why}")
    return path
