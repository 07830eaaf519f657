"""What a certificate says and whether it holds: its identities (URI SANs), whether it is
the CA, current, and the pair of a key; a verified peer's identity."""

from __future__ import annotations

import re
import ssl
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.errors import PkiError
from mesh.names import CLUSTER_PATTERN as _CLUSTER_PATTERN
from mesh.pki.tls import (
    NodeIdentity,
)

_CLUSTER_URI = re.compile(rf"spiffe://({_CLUSTER_PATTERN})")


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def identities(cert: x509.Certificate) -> list[NodeIdentity]:
    """Every spiffe URI SAN as an identity; a malformed one raises, never passes silently."""
    return [NodeIdentity.from_uri(u) for u in _uris(cert) if u.startswith("spiffe://")]


def identity_in(cert: x509.Certificate, cluster: str) -> NodeIdentity:
    ours = [i for i in identities(cert) if i.cluster == cluster]
    if len(ours) != 1:
        found = ", ".join(_uris(cert)) or "no URI SAN"
        raise PkiError(
            f"certificate {cert.subject.rfc4514_string()} carries no single identity "
            f"in cluster {cluster!r} ({found})"
        )
    return ours[0]


def cluster_of_cert(cert: x509.Certificate, path: Path) -> str:
    clusters = [m[1] for m in map(_CLUSTER_URI.fullmatch, _uris(cert)) if m is not None]
    if len(clusters) != 1:
        raise PkiError(f"{path} is not a meshsync CA: it names no single spiffe://<cluster>")
    return clusters[0]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _spki(public: object) -> bytes | None:
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None  # not a key we issue, so it cannot match ours
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_key_matches(
    cert: x509.Certificate, cert_path: Path, key: ec.EllipticCurvePrivateKey, key_path: Path
) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PkiError(f"{key_path} is not the private key of {cert_path}")


def check_current(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def identity_from_der(der: bytes, cluster: str) -> NodeIdentity:
    """The identity in ``cluster`` of a peer certificate that TLS has already verified."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise PkiError(f"parse peer certificate: {err}") from err
    return identity_in(cert, cluster)


def identity_from_ssl(ssl_object: ssl.SSLObject | ssl.SSLSocket, cluster: str) -> NodeIdentity:
    """The identity in ``cluster`` of the peer of a completed TLS handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise PkiError("peer presented no certificate")
    return identity_from_der(der, cluster)
