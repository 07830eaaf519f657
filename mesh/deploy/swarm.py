"""The Swarm secrets compose/stack.yml expects, made from a PKI directory.

One set per version (Swarm secrets are immutable; a new set and a redeploy with
``MESH_SECRETS=<version>`` rotate them)::

    <prefix>-<version>-ca.crt   the CA certificate         every agent and the signer
    <prefix>-<version>-ca.key   the CA key                 the signer only
    <prefix>-<version>-join     a fresh random join token  every agent and the signer

No node key is among them: each node makes its own (mesh/pki/enroll.py).
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh import pki
from mesh.errors import PkiError

DEFAULT_PREFIX = "meshsync"
DEFAULT_VERSION = "v1"
KINDS = ("ca.crt", "ca.key", "join")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,19}")

Run = Callable[..., subprocess.CompletedProcess[bytes]]


class SwarmError(PkiError):
    """A Swarm secret of the PKI could not be made; the message says which and why."""


@dataclass(frozen=True)
class SwarmSecret:
    name: str
    data: bytes = b""
    labels: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:  # never print a key or a token by accident
        return f"SwarmSecret({self.name!r}, {len(self.data)} bytes)"


def secret_name(kind: str, *, prefix: str = DEFAULT_PREFIX, version: str = DEFAULT_VERSION) -> str:
    for what, part in (("prefix", prefix), ("version", version)):
        if _PART.fullmatch(part) is None:
            raise SwarmError(f"invalid {what} {part!r}: must match {_PART.pattern}")
    if kind not in KINDS:
        raise SwarmError(f"unknown secret kind {kind!r}")
    return f"{prefix}-{version}-{kind}"


def plan(
    pki_dir: Path, *, prefix: str = DEFAULT_PREFIX, version: str = DEFAULT_VERSION
) -> list[SwarmSecret]:
    """The secrets of one version, from the CA in ``pki_dir`` (checked) and a new token."""
    cert_path, key_path = pki_dir / pki.CA_CERT, pki_dir / pki.CA_KEY
    ca = pki.load_ca(cert_path, key_path)
    labels = (("meshsync.cluster", ca.cluster), ("meshsync.version", version))
    data = {
        "ca.crt": cert_path.read_bytes(),
        "ca.key": key_path.read_bytes(),
        "join": secrets.token_urlsafe(32).encode() + b"\n",
    }
    return [
        SwarmSecret(secret_name(kind, prefix=prefix, version=version), data[kind], labels)
        for kind in KINDS
    ]


def create(
    planned: Sequence[SwarmSecret],
    *,
    docker: Sequence[str] = ("docker",),
    run: Run = subprocess.run,
) -> None:
    """Create every secret with the docker CLI (its DOCKER_HOST or context picks the Swarm
    manager); refuse before creating any if one of them exists already."""
    existing = [
        s.name for s in planned
        if _docker(run, [*docker, "secret", "inspect", s.name], check=False).returncode == 0
    ]
    if existing:
        raise SwarmError(
            f"secrets exist already: {', '.join(existing)} (make a new version with --version)"
        )
    for secret in planned:
        labels = [arg for key, value in secret.labels for arg in ("--label", f"{key}={value}")]
        _docker(run, [*docker, "secret", "create", *labels, secret.name, "-"], data=secret.data)


def _docker(
    run: Run, argv: list[str], *, data: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    try:
        done = run(argv, input=data, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SwarmError(f"run {' '.join(argv[:4])}: {err}") from err
    if check and done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        raise SwarmError(f"{' '.join(argv[:4])} {argv[-2]}: {why}")
    return done
