"""TLS material of a node, without the certificate machinery.

Node identities, the checked paths of a node's key and certificate, and the
SSL contexts every connection uses. Kept apart from ``mesh.pki`` (which makes
and inspects certificates with ``cryptography``) so that the processes started
once per push — the gate and the remote shell — start fast.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import PkiError
from mesh.names import CLUSTER_PATTERN, NODE_PATTERN

NODE_URI = re.compile(rf"spiffe://({CLUSTER_PATTERN})/node/({NODE_PATTERN})")


def check_name(kind: str, value: object, pattern: str) -> None:
    if not isinstance(value, str) or re.fullmatch(pattern, value) is None:
        raise PkiError(f"invalid {kind} name {value!r}: must match {pattern}")


@dataclass(frozen=True)
class NodeIdentity:
    """Who a certificate speaks for: one node of one cluster."""

    cluster: str
    node: str

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster, CLUSTER_PATTERN)
        check_name("node", self.node, NODE_PATTERN)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.cluster}/node/{self.node}"

    @classmethod
    def from_uri(cls, uri: str) -> NodeIdentity:
        match = NODE_URI.fullmatch(uri) if isinstance(uri, str) else None
        if match is None:
            raise PkiError(f"not a meshsync node identity: {uri!r}")
        return cls(match[1], match[2])


@dataclass(frozen=True)
class NodeCredentials:
    """Checked paths of one node's TLS material, ready for an ``ssl.SSLContext``."""

    identity: NodeIdentity
    ca_cert: Path
    cert: Path
    key: Path


def _ssl_context(creds: NodeCredentials, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks, as Python 3.13's default context has; our certificates pass.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=creds.ca_cert)
        ctx.load_cert_chain(creds.cert, creds.key)
    except OSError as err:  # ssl.SSLError is an OSError
        raise PkiError(f"load TLS credentials of {creds.identity.uri}: {err}") from err
    return ctx


def server_ssl_context(creds: NodeCredentials) -> ssl.SSLContext:
    """Accept only clients with a current certificate from the cluster CA."""
    return _ssl_context(creds, server=True)


def client_ssl_context(creds: NodeCredentials) -> ssl.SSLContext:
    """Trust only servers with a current certificate from the cluster CA.

    Hostnames are not checked: peers are dialled by overlay IPs and service names that
    need not be in their certificate. Any cluster member passes the handshake; the caller
    must check *which* one with ``identity_from_ssl``.
    """
    ctx = _ssl_context(creds, server=False)
    ctx.check_hostname = False
    return ctx


class ClientContexts:
    """``client_ssl_context`` for each push without loading the CA and the key pair every
    time (a tenth of a sender's CPU per small push, measured with py-spy): made once per
    credentials, and again when one of their files changes (a renewed certificate)."""

    def __init__(self) -> None:
        self._made: dict[NodeCredentials, tuple[tuple[int, ...], ssl.SSLContext]] = {}

    def get(self, creds: NodeCredentials) -> ssl.SSLContext:
        try:
            stamp = tuple(n for path in (creds.ca_cert, creds.cert, creds.key)
                          for st in (path.stat(),) for n in (st.st_ino, st.st_mtime_ns))
        except OSError as err:
            raise PkiError(f"load TLS credentials of {creds.identity.uri}: {err}") from err
        made = self._made.get(creds)
        if made is None or made[0] != stamp:
            made = self._made[creds] = (stamp, client_ssl_context(creds))
        return made[1]


def identity_from_peercert(cert: dict[str, object] | None, cluster: str) -> NodeIdentity:
    """The identity in ``cluster`` of a peer whose certificate TLS has verified,
    from ``getpeercert()``'s parsed form (no certificate parsing of our own)."""
    sans = cert.get("subjectAltName", ()) if cert else ()
    found = []
    for kind, value in sans if isinstance(sans, tuple) else ():
        match = NODE_URI.fullmatch(value) if kind == "URI" else None
        if match is not None and match[1] == cluster:
            found.append(NodeIdentity(match[1], match[2]))
    if len(found) != 1:
        raise PkiError(f"peer certificate has {len(found)} identities in cluster {cluster}")
    return found[0]
