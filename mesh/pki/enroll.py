"""Enrolment: a node makes its own key and has the cluster's signer certify it.

Why (README, "Swarm"): every task of a Swarm service receives the same secrets, so the
keys of a ``mode: global`` service cannot come one per node from Swarm secrets (secret
names are not templated; a templated secret only selects among secrets that are all
mounted). Instead each node generates its key in its own state volume, where it stays,
and sends a certificate request to the signer: one task, on a manager, that alone holds
the CA key. Every node holds the CA certificate and the join token, as Swarm's own
``docker swarm join`` does (a token to ask, the CA to check who answers).

The signer pins the first key it certifies for a node id (trust on first use), so a
holder of the join token can enrol new node ids but cannot take over an enrolled one.

Protocol, version 1: one TLS connection (the client verifies the signer with the CA
certificate and its URI SAN ``spiffe://<cluster>/signer``), one JSON line each way::

    client -> {"v": 1, "token": "...", "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
    signer -> {"cert": "-----BEGIN CERTIFICATE-----..."}  or  {"error": "why"}

The node id is the request's common name; the certificate is what ``mesh pki issue``
makes for that node.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh import pki
from mesh.config.values import HostPort
from mesh.errors import PkiError

LOG = logging.getLogger(__name__)

SIGNER_PORT = 8874
PROTOCOL = 1
MAX_LINE = 16 * 1024  # a P-256 request or certificate is under 2 KiB
IO_TIMEOUT = 10.0


class Refused(PkiError):
    """The signer answered and said no: retrying the same request cannot help."""


def signer_uri(cluster: str) -> str:
    return f"spiffe://{cluster}/signer"


def read_token(path: Path) -> bytes:
    try:
        token = path.read_bytes().strip()
    except OSError as err:
        raise PkiError(f"read join token {path}: {err.strerror or err}") from err
    if len(token) < 16:
        raise PkiError(f"join token {path} is shorter than 16 bytes")
    return token


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the signer ------------------------------------------------------------------------------


@dataclass
class Signer:
    """Certifies node keys for holders of the join token; pins each node's first key."""

    ca: pki.ClusterCa
    token: bytes
    pins_dir: Path
    days: int = 365
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sign(self, request: object, *, now: datetime | None = None) -> x509.Certificate:
        """The certificate for a well-formed request from a token holder; else ``Refused``."""
        if not isinstance(request, dict) or request.get("v") != PROTOCOL:
            raise Refused(f"not a version {PROTOCOL} enrolment request")
        token, csr_pem = request.get("token"), request.get("csr")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.token):
            raise Refused("wrong join token")
        if not isinstance(csr_pem, str):
            raise Refused("no certificate request")
        node, key = _parse_csr(csr_pem)
        try:
            identity = pki.NodeIdentity(self.ca.cluster, node)
        except PkiError as err:
            raise Refused(str(err)) from None
        if node.lower() == "ca":
            raise Refused("node name 'ca' is reserved for the cluster CA's files")
        with self._lock:
            self._pin(node, key)
        return pki.sign_leaf(
            self.ca, identity.uri, node, key, pki.node_sans(), now=now, days=self.days
        )

    def _pin(self, node: str, key: ec.EllipticCurvePublicKey) -> None:
        pin = self.pins_dir / f"{node}.pub"
        spki = _spki(key)
        try:
            known = pin.read_bytes()
        except FileNotFoundError:
            self.pins_dir.mkdir(parents=True, exist_ok=True)
            pin.write_bytes(spki)
            LOG.info("enrolled new node %s", node)
            return
        if known != spki:
            raise Refused(
                f"node {node} is enrolled with another key; if that node was rebuilt, "
                f"delete {pin} in the signer's task (README, Swarm)"
            )


def _parse_csr(pem: str) -> tuple[str, ec.EllipticCurvePublicKey]:
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        valid = csr.is_signature_valid
    except ValueError as err:
        raise Refused(f"unreadable certificate request: {err}") from None
    if not valid:
        raise Refused("the certificate request is not signed by its own key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise Refused("the key must be EC P-256")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise Refused("the request must name one node as its common name")
    return names[0].value, key


def signer_context(ca: pki.ClusterCa, workdir: Path) -> ssl.SSLContext:
    """The signer's TLS server context, with a fresh key certified as the signer; clients
    have no certificate yet, so none is asked for."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_leaf(ca, signer_uri(ca.cluster), "signer", key.public_key(), pki.node_sans())
    cert_path, key_path = workdir / "signer.crt", workdir / "signer.key"
    pki.write_key(key_path, key)
    pki.write_cert(cert_path, cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def answer(signer: Signer, line: bytes, peer: str) -> dict[str, str]:
    """The reply to one request line; every outcome is logged with who asked."""
    try:
        request = json.loads(line)
    except ValueError:
        request = None
    try:
        cert = signer.sign(request)
    except Refused as err:
        LOG.warning("refused enrolment from %s: %s", peer, err)
        return {"error": str(err)}
    LOG.info("certified %s for %s", cert.subject.rfc4514_string(), peer)
    return {"cert": cert.public_bytes(serialization.Encoding.PEM).decode()}


class _Handler(socketserver.BaseRequestHandler):
    server: SignerServer

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        self.request.settimeout(IO_TIMEOUT)
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as tls:
                line = _read_line(tls)
                if not line:
                    return
                reply = answer(self.server.signer, line, peer)
                tls.sendall(json.dumps(reply).encode() + b"\n")
        except ssl.SSLEOFError:
            # A bare TCP connect, as the stack's health check makes: nothing to report.
            LOG.debug("connection from %s closed before a request", peer)
        except (OSError, PkiError) as err:  # ssl.SSLError and timeouts are OSErrors
            LOG.warning("enrolment connection from %s: %s", peer, err)


class SignerServer(socketserver.ThreadingTCPServer):
    """One thread per connection; each is bounded by ``IO_TIMEOUT``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: HostPort, signer: Signer, context: ssl.SSLContext) -> None:
        self.signer = signer
        self.context = context
        if ":" in listen.host:
            self.address_family = socket.AF_INET6
        super().__init__((listen.host, listen.port), _Handler)


# --- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollSettings:
    node: str
    pki_dir: Path  # where the agent reads ca.crt, NODE.crt and NODE.key
    ca_file: Path
    join_file: Path
    signer: HostPort
    wait: float = 120.0  # seconds to keep trying to reach the signer
    renew_days: int = 30  # enrol again when the certificate expires sooner than this
    cluster: str | None = None  # the cluster the agent is configured for, checked against the CA


def enroll(
    settings: EnrollSettings,
    *,
    request: Callable[[HostPort, Path, str, bytes], Mapping[str, Any]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Make sure ``pki_dir`` holds the CA certificate and a current certificate for this
    node's own key, enrolling with the signer if not; return what was done, in words."""
    pki_dir, node = settings.pki_dir, settings.node
    pki_dir.mkdir(parents=True, exist_ok=True)
    pki_dir.chmod(0o700)
    ca_cert = pki.load_cert(settings.ca_file)
    pki.write_cert(pki_dir / pki.CA_CERT, ca_cert)  # a rotated CA replaces the old one here
    cluster = pki.cluster_of(pki_dir)
    if settings.cluster is not None and settings.cluster != cluster:
        raise PkiError(f"the CA is cluster {cluster!r}, the agent is set for {settings.cluster!r}")
    pki.NodeIdentity(cluster, node)  # a bad node name fails here, before any key is made
    key = _own_key(pki_dir / f"{node}.key")
    reason = _why_enrol(pki_dir, node, settings.renew_days)
    if reason is None:
        return f"{node}: certificate current, nothing to do"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    payload = json.dumps(
        {"v": PROTOCOL, "token": read_token(settings.join_file).decode(),
         "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    ).encode()
    reply = _ask_until(settings, cluster, payload, request or ask_signer, clock, sleep)
    if "cert" not in reply or not isinstance(reply["cert"], str):
        raise Refused(f"the signer refused: {reply.get('error', 'no reason given')}")
    try:
        cert = x509.load_pem_x509_certificate(reply["cert"].encode())
    except ValueError as err:
        raise PkiError(f"the signer sent an unreadable certificate: {err}") from None
    cert_path = pki_dir / f"{node}.crt"
    pki.write_cert(cert_path, cert)
    try:
        pki.load_node(pki_dir, node)  # issued by our CA, for our key, for this node
    except PkiError:
        cert_path.unlink(missing_ok=True)
        raise
    until = cert.not_valid_after_utc
    return f"{node}: enrolled ({reason}); certificate valid until {until:%Y-%m-%d}"


def _own_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return pki.load_key(path)
    key = ec.generate_private_key(ec.SECP256R1())
    pki.write_key(path, key)
    return key


def _why_enrol(pki_dir: Path, node: str, renew_days: int) -> str | None:
    if not (pki_dir / f"{node}.crt").exists():
        return "no certificate yet"
    try:
        creds = pki.load_node(pki_dir, node)
    except PkiError as err:
        return f"the certificate is not usable: {err}"
    left = pki.load_cert(creds.cert).not_valid_after_utc - datetime.now(UTC)
    if left < timedelta(days=renew_days):
        return f"the certificate expires in {left.days} days"
    return None


def _ask_until(
    settings: EnrollSettings,
    cluster: str,
    payload: bytes,
    request: Callable[[HostPort, Path, str, bytes], Mapping[str, Any]],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Mapping[str, Any]:
    """Ask the signer, retrying connection failures (it may not be scheduled yet) with a
    capped backoff until ``settings.wait`` runs out; a refusal is final."""
    deadline = clock() + settings.wait
    delay = 0.5
    while True:
        try:
            return request(settings.signer, settings.ca_file, cluster, payload)
        except (OSError, PkiError) as err:
            if isinstance(err, Refused) or clock() + delay > deadline:
                raise PkiError(f"enrol with the signer at {settings.signer}: {err}") from err
            LOG.info("signer at %s not reachable yet (%s); retrying in %.1f s",
                     settings.signer, err, delay)
        sleep(delay)
        delay = min(delay * 2, 5.0)


def ask_signer(signer: HostPort, ca_file: Path, cluster: str, payload: bytes) -> dict[str, Any]:
    """One request to the signer over TLS; the signer must prove it is the cluster's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the identity is the URI SAN, checked below
    ctx.load_verify_locations(cafile=ca_file)
    with (
        socket.create_connection((signer.host, signer.port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        sans = (tls.getpeercert() or {}).get("subjectAltName", ())
        if ("URI", signer_uri(cluster)) not in sans:
            raise PkiError(f"{signer} is not the signer of cluster {cluster}")
        tls.sendall(payload + b"\n")
        reply = json.loads(_read_line(tls))
    if not isinstance(reply, dict):
        raise PkiError("the signer's reply is not a JSON object")
    return reply


def _read_line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise PkiError(f"a line longer than {MAX_LINE} bytes")
    return data.strip()


def run_signer(
    signer: Signer, listen: HostPort, *, ready: Callable[[SignerServer], None] | None = None
) -> None:
    """Serve enrolments until the process is stopped."""
    with tempfile.TemporaryDirectory(prefix="mesh-signer-") as workdir:
        context = signer_context(signer.ca, Path(workdir))
    with SignerServer(listen, signer, context) as server:
        LOG.info("signer of cluster %s listening on %s", signer.ca.cluster, listen)
        if ready is not None:
            ready(server)
        server.serve_forever()
