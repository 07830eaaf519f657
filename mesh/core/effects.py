"""What the replica (``mesh.core.replica``) is fed and what it hands back: the state of a
path, what the scanner observed, the effects to carry out, and the store it keeps its
state in (``ReplicaStore``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mesh.core.manifest import ContentKey, Entry, Kind
from mesh.core.resolver import Conflict, Version
from mesh.core.vclock import VersionVector


@dataclass(frozen=True, slots=True)
class PathState:
    disk: Version | None = None
    target: Version | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    """What the scanner found at a path (absence is ``None``)."""

    kind: Kind
    hash: bytes
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644

    @property
    def content(self) -> ContentKey:
        return (self.kind, self.hash, 0 if self.kind is Kind.SYMLINK else self.mode)


@dataclass(frozen=True, slots=True)
class Announce:
    """Our disk now holds ``version``: tell every peer (all of its heads)."""

    version: Version


@dataclass(frozen=True, slots=True)
class Logged:
    """A conflict this node had not logged before: log it and tell every peer."""

    conflict: Conflict


@dataclass(frozen=True, slots=True)
class WriteCopy:
    """Materialize ``source``'s content at ``path`` (a conflict copy).

    The content is at ``source.path`` when the disk holds it there, else in
    the keep area. Never overwrite an existing file at ``path``.
    """

    path: str
    source: Entry


@dataclass(frozen=True, slots=True)
class Restore:
    """Put ``version``'s content (from the keep area) at its path, or delete
    it for a tombstone; whatever it replaces goes to the keep area.

    The executor scans the path first and restores only if ``version`` is
    still the target afterwards, so a restore never replaces content the index
    has not recorded (that would make our own writes look like foreign edits).
    """

    version: Version


@dataclass(frozen=True, slots=True)
class Want:
    """We need ``version``'s content; a peer holding it will push it."""

    version: Version


Effect = Announce | Logged | WriteCopy | Restore | Want


class ReplicaStore(Protocol):
    def state(self, path: str) -> PathState: ...
    def set_state(self, path: str, state: PathState) -> None: ...
    def peer_vector(self, peer: str, path: str) -> VersionVector | None: ...
    def set_peer_vector(self, peer: str, path: str, vector: VersionVector) -> None: ...
    def log_conflict(self, conflict: Conflict) -> bool:
        """Record ``conflict``; False when its id was already logged."""
        ...

    def kept(self, content: ContentKey) -> bool:
        """Whether the keep area holds this content."""
        ...

    def paths_under(self, folder: str) -> list[str]:
        """The paths known strictly inside ``folder``."""
        ...
