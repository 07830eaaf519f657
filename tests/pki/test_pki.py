"""The cluster PKI with real keys, real certificates and real TLS handshakes on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.main import get_command
from typer.testing import CliRunner

from mesh import pki
from mesh.cli.pki import pki_app
from mesh.errors import PkiError
from mesh.pki import NodeCredentials, NodeIdentity
from mesh.pki.tls import ClientContexts

CLUSTER = "alpha"
LONG_AGO = datetime.now(UTC) - timedelta(days=3 * 365)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    """A cluster CA and two nodes, n1 and n2."""
    directory = tmp_path / "pki"
    pki.init_ca(directory, CLUSTER)
    pki.issue(directory, ["n1", "n2"])
    return directory


@pytest.fixture
def foreign_dir(tmp_path: Path) -> Path:
    """Another CA that claims the same cluster name, with its own n1: an impostor."""
    directory = tmp_path / "foreign"
    pki.init_ca(directory, CLUSTER)
    pki.issue(directory, ["n1"])
    return directory


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _replace_node_files(dest: Path, source: Path, node: str, as_node: str | None = None) -> None:
    for suffix in (".crt", ".key"):
        shutil.copyfile(source / f"{node}{suffix}", dest / f"{as_node or node}{suffix}")


# --- NodeIdentity ------------------------------------------------------------------------


def test_identity_uri_round_trip() -> None:
    identity = NodeIdentity("alpha-2", "Node_1.eu-west")
    assert identity.uri == "spiffe://alpha-2/node/Node_1.eu-west"
    assert NodeIdentity.from_uri(identity.uri) == identity


@pytest.mark.parametrize(
    ("cluster", "node"),
    [
        ("", "n1"),
        ("Alpha", "n1"),
        ("-alpha", "n1"),
        ("al_pha", "n1"),
        ("a" * 64, "n1"),
        ("alpha", ""),
        ("alpha", ".n1"),
        ("alpha", "-n1"),
        ("alpha", "n1/../x"),
        ("alpha", "n 1"),
        ("alpha", "n1\n"),
        ("alpha", "n" * 65),
    ],
)
def test_identity_rejects_bad_names(cluster: str, node: str) -> None:
    with pytest.raises(PkiError, match="invalid"):
        NodeIdentity(cluster, node)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://alpha",
        "spiffe://alpha/node/",
        "spiffe://alpha/node/n1/extra",
        "spiffe://alpha/other/n1",
        "https://alpha/node/n1",
        "spiffe://Alpha/node/n1",
    ],
)
def test_identity_from_uri_rejects_anything_else(uri: str) -> None:
    with pytest.raises(PkiError, match="not a meshsync node identity"):
        NodeIdentity.from_uri(uri)


# --- init_ca and issue -------------------------------------------------------------------


def test_init_ca_writes_a_private_ca(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"
    cert_path = pki.init_ca(directory, CLUSTER)
    assert cert_path == directory / "ca.crt"
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    assert pki.cluster_of(directory) == CLUSTER
    constraints = _cert(cert_path).extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca


def test_init_ca_refuses_to_overwrite(pki_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in pki_dir.iterdir()}
    with pytest.raises(PkiError, match="refusing to overwrite"):
        pki.init_ca(pki_dir, "beta")
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir()} == before


def test_init_ca_refuses_a_lone_ca_key(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").write_text("precious")
    with pytest.raises(PkiError, match=r"ca.key"):
        pki.init_ca(tmp_path, CLUSTER)
    assert not tmp_path.joinpath("ca.crt").exists()


def test_issued_cert_chains_to_the_ca_and_carries_the_identity(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, CLUSTER)
    [cert_path] = pki.issue(tmp_path, ["n1"], dns_names=["n1.mesh"], ip_addresses=["10.0.0.7"])
    assert cert_path == tmp_path / "n1.crt"
    assert _mode(tmp_path / "n1.key") == 0o600
    cert, ca = _cert(cert_path), _cert(tmp_path / "ca.crt")
    # An independent, strict RFC 5280 path validation, not our own code checking itself.
    verifier = PolicyBuilder().store(Store([ca])).build_client_verifier()
    assert verifier.verify(cert, []).chain == [cert, ca]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert next(iter(san)) == x509.UniformResourceIdentifier("spiffe://alpha/node/n1")
    assert san.get_values_for_type(x509.DNSName) == ["n1", "localhost", "n1.mesh"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ip_address("127.0.0.1"),
        ip_address("10.0.0.7"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_issue_refuses_to_overwrite_unless_asked(pki_dir: Path) -> None:
    serial = _cert(pki_dir / "n1.crt").serial_number
    with pytest.raises(PkiError, match=r"refusing to overwrite .*n1.crt"):
        pki.issue(pki_dir, ["n3", "n1"])
    assert not (pki_dir / "n3.crt").exists()  # all or nothing
    pki.issue(pki_dir, ["n1"], overwrite=True)
    assert _cert(pki_dir / "n1.crt").serial_number != serial
    assert pki.load_node(pki_dir, "n1").identity == NodeIdentity(CLUSTER, "n1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": ["ca"]}, "reserved"),
        ({"nodes": ["bad/name"]}, "invalid node name"),
        ({"nodes": ["n3"], "ip_addresses": ["10.0.0.999"]}, "does not appear to be an IPv4"),
        ({"nodes": ["n3"], "days": 0}, "at least one day"),
    ],
)
def test_issue_rejects_bad_input(pki_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PkiError, match=message):
        pki.issue(pki_dir, **kwargs)  # type: ignore[arg-type]


def test_issue_needs_the_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"read certificate .*ca.crt: No such file"):
        pki.issue(tmp_path, ["n1"])


def test_show_lists_the_ca_first_and_flags_missing_keys(pki_dir: Path) -> None:
    (pki_dir / "n2.key").unlink()
    infos = pki.show(pki_dir)
    assert [(i.path.name, i.is_ca, i.has_key) for i in infos] == [
        ("ca.crt", True, True),
        ("n1.crt", False, True),
        ("n2.crt", False, False),
    ]
    assert infos[0].identity is None
    assert infos[1].identity == NodeIdentity(CLUSTER, "n1")
    fingerprint = _cert(pki_dir / "n1.crt").fingerprint(hashes.SHA256())
    assert infos[1].fingerprint_sha256.replace(":", "").lower() == fingerprint.hex()


# --- load_node ---------------------------------------------------------------------------


def test_load_node_returns_checked_credentials(pki_dir: Path) -> None:
    assert pki.load_node(pki_dir, "n1") == NodeCredentials(
        identity=NodeIdentity(CLUSTER, "n1"),
        ca_cert=pki_dir / "ca.crt",
        cert=pki_dir / "n1.crt",
        key=pki_dir / "n1.key",
    )


def test_load_node_rejects_an_expired_cert(pki_dir: Path) -> None:
    pki.issue(pki_dir, ["n1"], now=LONG_AGO, days=1, overwrite=True)
    with pytest.raises(PkiError, match=r"n1.crt expired on 20\d\d-"):
        pki.load_node(pki_dir, "n1")


def test_load_node_rejects_a_cert_of_another_ca(pki_dir: Path, foreign_dir: Path) -> None:
    _replace_node_files(pki_dir, foreign_dir, "n1")
    with pytest.raises(PkiError, match=r"n1.crt was not issued by this cluster's CA"):
        pki.load_node(pki_dir, "n1")


def test_load_node_rejects_another_nodes_cert(pki_dir: Path) -> None:
    _replace_node_files(pki_dir, pki_dir, "n2", as_node="n1")
    with pytest.raises(PkiError, match=r"certificate of spiffe://alpha/node/n2, not .*/n1"):
        pki.load_node(pki_dir, "n1")


def test_load_node_rejects_a_key_of_another_cert(pki_dir: Path) -> None:
    shutil.copyfile(pki_dir / "n2.key", pki_dir / "n1.key")
    with pytest.raises(PkiError, match=r"n1.key is not the private key of .*n1.crt"):
        pki.load_node(pki_dir, "n1")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "n1.key").unlink(), r"read private key .*n1.key: No such file"),
        (lambda d: (d / "ca.crt").unlink(), r"read certificate .*ca.crt: No such file"),
        (lambda d: (d / "n1.crt").write_text("junk"), r"parse certificate .*n1.crt"),
        (lambda d: (d / "n1.key").write_text("junk"), r"parse private key .*n1.key"),
    ],
)
def test_load_node_names_the_bad_file(
    pki_dir: Path, damage: Callable[[Path], object], message: str
) -> None:
    damage(pki_dir)
    with pytest.raises(PkiError, match=message):
        pki.load_node(pki_dir, "n1")


# --- identity_from_der -------------------------------------------------------------------


def _der(path: Path) -> bytes:
    return _cert(path).public_bytes(serialization.Encoding.DER)


def _self_signed_der(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if uris:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_identity_from_der_round_trip(pki_dir: Path) -> None:
    der = _der(pki_dir / "n2.crt")
    assert pki.identity_from_der(der, CLUSTER) == NodeIdentity(CLUSTER, "n2")


def test_identity_from_der_picks_the_asked_cluster() -> None:
    der = _self_signed_der(["spiffe://beta/node/b1", "spiffe://alpha/node/a1"])
    assert pki.identity_from_der(der, "alpha") == NodeIdentity("alpha", "a1")
    assert pki.identity_from_der(der, "beta") == NodeIdentity("beta", "b1")


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"not a certificate", "parse peer certificate"),
        (_self_signed_der([]), "no single identity in cluster 'alpha' \\(no URI SAN\\)"),
        (_self_signed_der(["spiffe://beta/node/n1"]), "no single identity in cluster 'alpha'"),
        (_self_signed_der(["spiffe://alpha/node/a/b"]), "not a meshsync node identity"),
        (
            _self_signed_der(["spiffe://alpha/node/a1", "spiffe://alpha/node/a2"]),
            "no single identity",
        ),
    ],
)
def test_identity_from_der_rejects(der: bytes, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        pki.identity_from_der(der, CLUSTER)


# --- TLS handshakes over 127.0.0.1 -------------------------------------------------------


@dataclass
class Outcome:
    """What one side of a handshake ended with: the peer's identity, or the error."""

    identity: NodeIdentity | None = None
    error: Exception | None = None


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext, outcome: Outcome) -> None:
    try:
        conn, _ = listener.accept()
        conn.settimeout(10)
        with conn, ctx.wrap_socket(conn, server_side=True) as tls:
            outcome.identity = pki.identity_from_ssl(tls, CLUSTER)
            tls.sendall(b"ok")
    except (OSError, PkiError) as err:
        outcome.error = err


def _connect(address: tuple[str, int], ctx: ssl.SSLContext) -> Outcome:
    outcome = Outcome()
    try:
        with socket.create_connection(address, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            # Under TLS 1.3 the server judges our certificate after our side of the
            # handshake is done; its verdict arrives with the first read.
            if tls.recv(2) != b"ok":
                raise ConnectionError("server closed the connection")
            outcome.identity = pki.identity_from_ssl(tls, CLUSTER)
    except (OSError, PkiError) as err:
        outcome.error = err
    return outcome


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Outcome, Outcome]:
    server = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        thread = threading.Thread(target=_serve_once, args=(listener, server_ctx, server))
        thread.start()
        client = _connect(listener.getsockname(), client_ctx)
        thread.join(timeout=10)
    assert not thread.is_alive()
    return server, client


def _bare_client(ca_cert: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca_cert)
    return ctx


def test_contexts_demand_certificates_and_tls_1_2(pki_dir: Path) -> None:
    creds = pki.load_node(pki_dir, "n1")
    server, client = pki.server_ssl_context(creds), pki.client_ssl_context(creds)
    for ctx in (server, client):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not client.check_hostname


def test_client_contexts_are_made_once_and_again_for_a_renewed_certificate(
        pki_dir: Path) -> None:
    contexts = ClientContexts()
    creds = pki.load_node(pki_dir, "n2")
    first = contexts.get(creds)
    assert contexts.get(creds) is first
    pki.issue(pki_dir, ["n2"], overwrite=True)  # renewed in place
    renewed = contexts.get(pki.load_node(pki_dir, "n2"))
    assert renewed is not first
    server, client = _handshake(pki.server_ssl_context(pki.load_node(pki_dir, "n1")), renewed)
    assert (server.error, client.error, server.identity) == (None, None,
                                                             NodeIdentity(CLUSTER, "n2"))
    with pytest.raises(PkiError, match="load TLS credentials"):
        contexts.get(NodeCredentials(creds.identity, creds.ca_cert, creds.cert,
                                     pki_dir / "missing.key"))


def test_handshake_tells_each_side_who_the_other_is(pki_dir: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(pki.load_node(pki_dir, "n1")),
        pki.client_ssl_context(pki.load_node(pki_dir, "n2")),
    )
    assert (server.error, client.error) == (None, None)
    assert server.identity == NodeIdentity(CLUSTER, "n2")
    assert client.identity == NodeIdentity(CLUSTER, "n1")


def _expired_n1(pki_dir: Path, foreign_dir: Path) -> Path:
    pki.issue(pki_dir, ["n1"], now=LONG_AGO, days=1, overwrite=True)
    return pki_dir


def _foreign_n1(pki_dir: Path, foreign_dir: Path) -> Path:
    return foreign_dir


@pytest.mark.parametrize(
    ("client_files", "reason"),
    [(_foreign_n1, "unable to get local issuer"), (_expired_n1, "certificate has expired")],
)
def test_server_refuses_a_client_cert(
    pki_dir: Path, foreign_dir: Path, client_files: Callable[[Path, Path], Path], reason: str
) -> None:
    files = client_files(pki_dir, foreign_dir)
    # Built by hand, past load_node's checks: the handshake must refuse on its own.
    creds = NodeCredentials(
        NodeIdentity(CLUSTER, "n1"), pki_dir / "ca.crt", files / "n1.crt", files / "n1.key"
    )
    server, client = _handshake(
        pki.server_ssl_context(pki.load_node(pki_dir, "n2")), pki.client_ssl_context(creds)
    )
    assert isinstance(server.error, ssl.SSLError)
    assert reason in str(server.error)
    assert server.identity is None
    assert isinstance(client.error, OSError)


def test_server_refuses_a_client_without_a_cert(pki_dir: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(pki.load_node(pki_dir, "n1")), _bare_client(pki_dir / "ca.crt")
    )
    assert isinstance(server.error, ssl.SSLError)
    assert "peer did not return a certificate" in str(server.error)
    assert isinstance(client.error, OSError)


def test_client_refuses_a_server_of_another_ca(pki_dir: Path, foreign_dir: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(pki.load_node(foreign_dir, "n1")),
        pki.client_ssl_context(pki.load_node(pki_dir, "n2")),
    )
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert isinstance(server.error, ssl.SSLError)


# --- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(pki_app, name="pki")
    return app


def _run(cli: typer.Typer, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["pki", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_cli_init_issue_show(cli: typer.Typer, tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    assert _run(cli, "init", "--dir", d, "--cluster", CLUSTER)[0] == 0
    code, out, _ = _run(cli, "issue", "n1", "n2", "--dir", d, "--dns", "x.mesh", "--ip", "10.1.2.3")
    assert code == 0 and "issued n2" in out
    code, out, _ = _run(cli, "show", "--dir", d)
    assert code == 0
    assert "spiffe://alpha/node/n1" in out and "ca.crt" in out
    code, out, _ = _run(cli, "show", "--dir", d, "--json")
    rows = json.loads(out)
    assert [(r["kind"], r["identity"], r["expired"]) for r in rows] == [
        ("ca", None, False),
        ("node", "spiffe://alpha/node/n1", False),
        ("node", "spiffe://alpha/node/n2", False),
    ]


def test_cli_show_flags_expired_certs(cli: typer.Typer, pki_dir: Path) -> None:
    pki.issue(pki_dir, ["n1"], now=LONG_AGO, days=1, overwrite=True)
    code, out, _ = _run(cli, "show", "--dir", str(pki_dir))
    assert code == 0 and "EXPIRED" in out
    rows = json.loads(_run(cli, "show", "--dir", str(pki_dir), "--json")[1])
    assert [r["expired"] for r in rows] == [False, True, False]


def test_cli_dir_comes_from_the_environment(cli: typer.Typer, tmp_path: Path) -> None:
    env = {"MESH_PKI_DIR": str(tmp_path / "from-env")}
    assert _run(cli, "init", "--cluster", CLUSTER, env=env)[0] == 0
    assert (tmp_path / "from-env" / "ca.crt").is_file()


def test_cli_issue_force_replaces(cli: typer.Typer, pki_dir: Path) -> None:
    serial = _cert(pki_dir / "n1.crt").serial_number
    assert _run(cli, "issue", "n1", "--dir", str(pki_dir), "--force")[0] == 0
    assert _cert(pki_dir / "n1.crt").serial_number != serial


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "--cluster", "beta"], "refusing to overwrite"),
        (["init", "--cluster", "Bad_Name"], "invalid cluster name"),
        (["issue", "n1"], "refusing to overwrite"),
        (["issue", "n3", "--ip", "nope"], "does not appear to be an IPv4"),
        (["show", "--dir", "/nonexistent/pki"], "no such directory"),
    ],
)
def test_cli_errors_are_one_line(
    cli: typer.Typer, pki_dir: Path, args: list[str], message: str
) -> None:
    code, out, err = _run(cli, *args, env={"MESH_PKI_DIR": str(pki_dir)})
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err + out


def test_cli_issue_needs_the_ca(cli: typer.Typer, tmp_path: Path) -> None:
    code, _, err = _run(cli, "issue", "n1", "--dir", str(tmp_path))
    assert code == 1 and "ca.crt: No such file" in err


def test_cli_has_help_on_every_command_and_option(cli: typer.Typer) -> None:
    group = get_command(cli).commands["pki"]  # type: ignore[attr-defined]
    assert group.help
    for name, command in group.commands.items():
        assert command.help, name
        for param in command.params:
            assert getattr(param, "help", None), f"{name} {param.name}"
