"""The cluster PKI: one CA per cluster, one key and certificate per node.

A PKI directory (what ``mesh pki`` writes, and what Swarm secrets carry to a node)::

    ca.crt  ca.key          the cluster CA; its URI SAN spiffe://<cluster> names the cluster
    <node>.crt  <node>.key  one pair per node; its URI SAN spiffe://<cluster>/node/<node>
                            is the node's identity

Peers are identified by that URI SAN, never by hostname: nodes reach each other by
overlay IPs and service names that change, while the identity in the certificate does
not. The URI follows the SPIFFE X509-SVID convention (spiffe.io, "X509-SVID" section 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import PkiError
from mesh.pki.tls import CLUSTER_PATTERN as _CLUSTER_PATTERN
from mesh.pki.tls import (  # re-exported: this module is the PKI's whole API
    NodeCredentials,
    NodeIdentity,
    check_name,
    client_ssl_context,
    server_ssl_context,
)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"

_CLUSTER_URI = re.compile(rf"spiffe://({_CLUSTER_PATTERN})")

# Nodes' clocks drift apart; backdating notBefore keeps a certificate issued on one host
# from being "not yet valid" on a peer whose clock runs a little behind.
_CLOCK_SKEW = timedelta(minutes=5)
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


# --- files -------------------------------------------------------------------------------


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


def _write_pair(cert_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_key(cert_path.with_suffix(".key"), key)
    # The certificate goes last: a .crt on disk means its key is complete beside it.
    write_cert(cert_path, cert)


def _refuse_existing(paths: Iterable[Path], remedy: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite {', '.join(existing)} ({remedy})")


def _node_files(pki_dir: Path, node: str) -> tuple[Path, Path]:
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
    _check_key_matches(cert, cert_path, key, key_path)
    return ClusterCa(cert, key, _cluster_of_cert(cert, cert_path))


def _load_ca(pki_dir: Path) -> ClusterCa:
    return load_ca(pki_dir / CA_CERT, pki_dir / CA_KEY)


# --- reading certificates ----------------------------------------------------------------


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def _identities(cert: x509.Certificate) -> list[NodeIdentity]:
    """Every spiffe URI SAN as an identity; a malformed one raises, never passes silently."""
    return [NodeIdentity.from_uri(u) for u in _uris(cert) if u.startswith("spiffe://")]


def _identity_in(cert: x509.Certificate, cluster: str) -> NodeIdentity:
    ours = [i for i in _identities(cert) if i.cluster == cluster]
    if len(ours) != 1:
        found = ", ".join(_uris(cert)) or "no URI SAN"
        raise PkiError(
            f"certificate {cert.subject.rfc4514_string()} carries no single identity "
            f"in cluster {cluster!r} ({found})"
        )
    return ours[0]


def _cluster_of_cert(cert: x509.Certificate, path: Path) -> str:
    clusters = [m[1] for m in map(_CLUSTER_URI.fullmatch, _uris(cert)) if m is not None]
    if len(clusters) != 1:
        raise PkiError(f"{path} is not a meshsync CA: it names no single spiffe://<cluster>")
    return clusters[0]


def _is_ca(cert: x509.Certificate) -> bool:
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


def _check_key_matches(
    cert: x509.Certificate, cert_path: Path, key: ec.EllipticCurvePrivateKey, key_path: Path
) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PkiError(f"{key_path} is not the private key of {cert_path}")


def _check_current(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _check_issued_by(cert: x509.Certificate, path: Path, ca: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PkiError(f"{path} was not issued by this cluster's CA ({CA_CERT})") from err


# --- making certificates -----------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, now: datetime, days: int
) -> x509.CertificateBuilder:
    if days < 1:
        raise PkiError(f"a certificate must be valid for at least one day, not {days}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def _name(cluster: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(pki_dir: Path, cluster: str, *, days: int = 3650, now: datetime | None = None) -> Path:
    """Create the cluster CA in ``pki_dir``; return the path of ``ca.crt``."""
    check_name("cluster", cluster, _CLUSTER_PATTERN)
    cert_path = pki_dir / CA_CERT
    _refuse_existing([cert_path, pki_dir / CA_KEY], "a cluster has exactly one CA")
    _make_private_dir(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(cluster, f"meshsync CA {cluster}")
    cert = (
        _builder(name, name, key.public_key(), _now(now), days)
        # path_length=0: this CA signs node certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signature=False, cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{cluster}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, cert, key)
    return cert_path


def _make_private_dir(pki_dir: Path) -> None:
    if pki_dir.is_dir():
        return  # the operator chose this directory and its mode; leave both alone
    try:
        pki_dir.mkdir(parents=True, mode=0o700)
        pki_dir.chmod(0o700)  # mkdir's mode is narrowed by the umask, chmod's is not
    except OSError as err:
        raise PkiError(f"create {pki_dir}: {err.strerror or err}") from err


def _extra_sans(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    try:
        dns = [x509.DNSName(n) for n in dict.fromkeys(["localhost", *dns_names]) if n]
        ips = [
            x509.IPAddress(ipaddress.ip_address(a))
            for a in dict.fromkeys(["127.0.0.1", *ip_addresses])
        ]
    except ValueError as err:
        raise PkiError(f"subject alternative names: {err}") from err
    return [*dns, *ips]


def issue(
    pki_dir: Path,
    nodes: Sequence[str],
    *,
    days: int = 825,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: datetime | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Issue a key and certificate per node, signed by the CA in ``pki_dir``.

    Returns the certificate paths, in the order of ``nodes``; each key lies beside its
    certificate with the suffix ``.key``. Nothing is written if any node would be refused.
    """
    ca = _load_ca(pki_dir)
    identities = [NodeIdentity(ca.cluster, n) for n in dict.fromkeys(nodes)]
    files = [_node_files(pki_dir, i.node) for i in identities]
    extra = _extra_sans(dns_names, ip_addresses)
    if not overwrite:
        _refuse_existing((p for pair in files for p in pair), "pass overwrite/--force to replace")
    moment = _now(now)
    for identity, (cert_path, _) in zip(identities, files, strict=True):
        _write_node_pair(cert_path, ca, identity, extra, moment, days)
    return [cert_path for cert_path, _ in files]


def _write_node_pair(
    cert_path: Path,
    ca: ClusterCa,
    identity: NodeIdentity,
    extra: list[x509.GeneralName],
    now: datetime,
    days: int,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_leaf(ca, identity.uri, identity.node, key.public_key(), extra, now=now, days=days)
    _write_pair(cert_path, cert, key)


def node_sans(
    dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()
) -> list[x509.GeneralName]:
    """The extra names ``issue`` puts in every node certificate (localhost, 127.0.0.1, ...)."""
    return _extra_sans(dns_names, ip_addresses)


def sign_leaf(
    ca: ClusterCa,
    uri: str,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    extra: Sequence[x509.GeneralName] = (),
    *,
    now: datetime | None = None,
    days: int = 825,
) -> x509.Certificate:
    """A certificate for ``public_key`` whose identity is the URI SAN ``uri``, signed by the
    cluster CA; what ``issue`` makes for a node, and ``mesh pki signer`` for a key it is sent."""
    # The URI SAN comes first: it is the identity; the DNS and IP names only let ordinary
    # TLS tools (openssl s_client, curl) talk to a node by the names it is reachable at.
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(uri),
        x509.DNSName(common_name),
    ]
    sans += [n for n in extra if n not in sans]
    return (
        _builder(_name(ca.cluster, common_name), ca.cert.subject, public_key, _now(now), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True, cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


# --- inspecting and loading --------------------------------------------------------------


def cluster_of(pki_dir: Path) -> str:
    """The cluster named by the CA certificate in ``pki_dir``."""
    path = pki_dir / CA_CERT
    return _cluster_of_cert(load_cert(path), path)


def show(pki_dir: Path) -> list[CertInfo]:
    """Every certificate in ``pki_dir``, the CA first, then by file name."""
    if not pki_dir.is_dir():
        raise PkiError(f"show {pki_dir}: no such directory")
    infos = [_info(path) for path in sorted(pki_dir.glob("*.crt"))]
    return sorted(infos, key=lambda info: not info.is_ca)  # stable: names stay sorted


def _info(path: Path) -> CertInfo:
    cert = load_cert(path)
    try:
        identities = _identities(cert)
    except PkiError:
        identities = []  # show reports what is there; load_node is where a bad one fails
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        identity=identities[0] if identities else None,
        is_ca=_is_ca(cert),
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
    identity = NodeIdentity(_cluster_of_cert(ca, ca_path), node)
    cert_path, key_path = _node_files(pki_dir, node)
    cert = load_cert(cert_path)
    _check_key_matches(cert, cert_path, load_key(key_path), key_path)
    now = datetime.now(UTC)
    _check_current(ca, ca_path, now)
    _check_issued_by(cert, cert_path, ca)
    _check_current(cert, cert_path, now)
    found = _identity_in(cert, identity.cluster)
    if found != identity:
        raise PkiError(f"{cert_path} is the certificate of {found.uri}, not {identity.uri}")
    return NodeCredentials(identity, ca_path, cert_path, key_path)


# --- TLS ---------------------------------------------------------------------------------


def identity_from_der(der: bytes, cluster: str) -> NodeIdentity:
    """The identity in ``cluster`` of a peer certificate that TLS has already verified."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise PkiError(f"parse peer certificate: {err}") from err
    return _identity_in(cert, cluster)


def identity_from_ssl(ssl_object: ssl.SSLObject | ssl.SSLSocket, cluster: str) -> NodeIdentity:
    """The identity in ``cluster`` of the peer of a completed TLS handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise PkiError("peer presented no certificate")
    return identity_from_der(der, cluster)


__all__ = [
    "CA_CERT", "CA_KEY", "CertInfo", "ClusterCa", "NodeCredentials", "NodeIdentity",
    "client_ssl_context", "cluster_of", "identity_from_der", "identity_from_ssl", "init_ca",
    "issue", "load_ca", "load_cert", "load_key", "load_node", "node_sans", "server_ssl_context",
    "show", "sign_leaf", "write_cert", "write_key",
]
