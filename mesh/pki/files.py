"""The PKI directory's files (``mesh.pki``): writing keys and certificates with their modes,
loading and checking them, and what ``mesh pki show`` lists."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.errors import PkiError
from mesh.pki.certs import (
    check_current,
    check_key_matches,
    cluster_of_cert,
    identities,
    identity_in,
    is_ca,
)
from mesh.pki.tls import (
    NodeCredentials,
    NodeIdentity,
)

CA_CERT = "ca.crt"


CA_KEY = "ca.key"


_KEY_MODE = 0o600


_CERT_MODE = 0o644


@dataclass(frozen=True)
class CertInfo:
    """What ``show`` found in one ``.crt`` file."""

    path: Path
    subject: str
    identity: NodeIdentity | None
    is_ca: bool
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str  # colon-separated hex, as ``openssl x509 -fingerprint`` prints it
    has_key: bool


@dataclass(frozen=True)
class ClusterCa:
    """The cluster CA's certificate and key, checked to belong together."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cluster: str


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PkiError(f"read {what} {path}: {err.strerror or err}") from err


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and a rename, so a crash never leaves half a key;
    the file has ``mode`` before the first byte lands, so a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the umask may have narrowed a certificate's mode
            file.write(data)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"write {path}: {err.strerror or err}") from err


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key (mode 0600, atomically)."""
    # Unencrypted: the daemon reads its key unattended; the key is protected by the file
    # mode here and, where Swarm carries it, by Swarm's encrypted secret store.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, key_pem, _KEY_MODE)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write a certificate (mode 0644, atomically)."""
    _write(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def write_pair(cert_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_key(cert_path.with_suffix(".key"), key)
    # The certificate goes last: a .crt on disk means its key is complete beside it.
    write_cert(cert_path, cert)


def refuse_existing(paths: Iterable[Path], remedy: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite {', '.join(existing)} ({remedy})")


def node_files(pki_dir: Path, node: str) -> tuple[Path, Path]:
    # A node called "ca" would write over the CA's files; "CA" too on a case-insensitive disk.
    if node.lower() == "ca":
        raise PkiError(f"node name {node!r} is reserved for the cluster CA's files")
    return pki_dir / f"{node}.crt", pki_dir / f"{node}.key"


def load_cert(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise PkiError(f"parse certificate {path}: {err}") from err


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:  # TypeError: encrypted key
        raise PkiError(f"parse private key {path}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"parse private key {path}: not an EC key")
    return key


def load_ca(cert_path: Path, key_path: Path) -> ClusterCa:
    """The cluster CA from its certificate and key files, wherever they lie."""
    cert = load_cert(cert_path)
    key = load_key(key_path)
    check_key_matches(cert, cert_path, key, key_path)
    return ClusterCa(cert, key, cluster_of_cert(cert, cert_path))


def load_ca_in(pki_dir: Path) -> ClusterCa:
    return load_ca(pki_dir / CA_CERT, pki_dir / CA_KEY)


def cluster_of(pki_dir: Path) -> str:
    """The cluster named by the CA certificate in ``pki_dir``."""
    path = pki_dir / CA_CERT
    return cluster_of_cert(load_cert(path), path)


def show(pki_dir: Path) -> list[CertInfo]:
    """Every certificate in ``pki_dir``, the CA first, then by file name."""
    if not pki_dir.is_dir():
        raise PkiError(f"show {pki_dir}: no such directory")
    infos = [_info(path) for path in sorted(pki_dir.glob("*.crt"))]
    return sorted(infos, key=lambda info: not info.is_ca)  # stable: names stay sorted


def _info(path: Path) -> CertInfo:
    cert = load_cert(path)
    try:
        found = identities(cert)
    except PkiError:
        found = []  # show reports what is there; load_node is where a bad one fails
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        identity=found[0] if found else None,
        is_ca=is_ca(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        has_key=path.with_suffix(".key").is_file(),
    )


def load_node(pki_dir: Path, node: str) -> NodeCredentials:
    """Check a node's key, certificate and CA before the daemon builds TLS from them, so a
    wrong file fails at start with one line instead of as handshake errors on every peer."""
    ca_path = pki_dir / CA_CERT
    ca = load_cert(ca_path)
    identity = NodeIdentity(cluster_of_cert(ca, ca_path), node)
    cert_path, key_path = node_files(pki_dir, node)
    cert = load_cert(cert_path)
    check_key_matches(cert, cert_path, load_key(key_path), key_path)
    now = datetime.now(UTC)
    check_current(ca, ca_path, now)
    _check_issued_by(cert, cert_path, ca)
    check_current(cert, cert_path, now)
    found = identity_in(cert, identity.cluster)
    if found != identity:
        raise PkiError(f"{cert_path} is the certificate of {found.uri}, not {identity.uri}")
    return NodeCredentials(identity, ca_path, cert_path, key_path)


def _check_issued_by(cert: x509.Certificate, path: Path, ca: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PkiError(f"{path} was not issued by this cluster's CA ({CA_CERT})") from err
