"""One exception root for everything meshsync raises on purpose.

Library exceptions (ssl, sqlite3, msgpack, amqtt) are translated once, at the
edge that calls the library, with ``raise ... from err``.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshsync raises on purpose."""


class LocalProtocolError(MeshError):
    """We misused an API or were handed a value we should never have built."""


class RemoteProtocolError(MeshError):
    """A peer sent something malformed or forbidden.

    ``peer`` names who sent it when known; ``reason`` is a short, stable
    description suitable for one log line.
    """

    def __init__(self, reason: str, *, peer: str | None = None) -> None:
        self.reason = reason
        self.peer = peer
        super().__init__(f"{peer}: {reason}" if peer else reason)


class InvalidPath(MeshError, ValueError):
    """A path that cannot cross a boundary (absolute, ``..``, NUL, too long...)."""


class ConfigError(MeshError):
    """A setting is missing or wrong; the message is one line for the operator."""


class PkiError(MeshError):
    """Certificates or keys are missing, unreadable, expired or not ours."""


class StoreError(MeshError):
    """The state database could not be opened, migrated or written."""
