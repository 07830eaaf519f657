"""Making certificates: the cluster CA (``init_ca``), node pairs (``issue``), and signing a
node's key (``sign_leaf``, what the enrolment signer does)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.errors import PkiError
from mesh.names import CLUSTER_PATTERN as _CLUSTER_PATTERN
from mesh.pki.files import (
    CA_CERT,
    CA_KEY,
    ClusterCa,
    load_ca_in,
    node_files,
    refuse_existing,
    write_pair,
)
from mesh.pki.tls import (
    NodeIdentity,
    check_name,
)

# Nodes' clocks drift apart; backdating notBefore keeps a certificate issued on one host
# from being "not yet valid" on a peer whose clock runs a little behind.
_CLOCK_SKEW = timedelta(minutes=5)


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
    refuse_existing([cert_path, pki_dir / CA_KEY], "a cluster has exactly one CA")
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
    write_pair(cert_path, cert, key)
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
    ca = load_ca_in(pki_dir)
    identities = [NodeIdentity(ca.cluster, n) for n in dict.fromkeys(nodes)]
    files = [node_files(pki_dir, i.node) for i in identities]
    extra = _extra_sans(dns_names, ip_addresses)
    if not overwrite:
        refuse_existing((p for pair in files for p in pair), "pass overwrite/--force to replace")
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
    write_pair(cert_path, cert, key)


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
