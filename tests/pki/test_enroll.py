"""Enrolment (mesh/pki/enroll.py): the signer's rules, and real TLS round trips on 127.0.0.1."""

from __future__ import annotations

import json
import ssl
import stat
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from mesh import pki
from mesh.cli import app
from mesh.config.values import HostPort
from mesh.errors import PkiError
from mesh.pki import enroll

CLUSTER = "alpha"
TOKEN = b"a-join-token-of-enough-length"


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory, CLUSTER)
    return directory


@pytest.fixture
def signer(ca_dir: Path, tmp_path: Path) -> enroll.Signer:
    ca = pki.load_ca(ca_dir / pki.CA_CERT, ca_dir / pki.CA_KEY)
    return enroll.Signer(ca, TOKEN, tmp_path / "pins")


def _csr(node: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def _request(csr: str, token: bytes = TOKEN) -> dict[str, object]:
    return {"v": enroll.PROTOCOL, "token": token.decode(), "csr": csr}


# --- the signer's rules ----------------------------------------------------------------------


def test_signer_certifies_the_requested_node_for_the_sent_key(signer: enroll.Signer) -> None:
    csr, key = _csr("n1")
    cert = signer.sign(_request(csr))
    cert.verify_directly_issued_by(signer.ca.cert)
    assert cert.public_key() == key.public_key()
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://alpha/node/n1"
    ]
    left = cert.not_valid_after_utc - datetime.now(UTC)
    assert 364 <= left.days <= 365


@pytest.mark.parametrize(
    ("request_doc", "why"),
    [
        (None, "not a version 1"),
        ({"v": 2, "token": TOKEN.decode(), "csr": "x"}, "not a version 1"),
        ({"v": 1, "token": "wrong-token-wrong-token", "csr": "x"}, "wrong join token"),
        ({"v": 1, "csr": "x"}, "wrong join token"),
        ({"v": 1, "token": TOKEN.decode()}, "no certificate request"),
        ({"v": 1, "token": TOKEN.decode(), "csr": "garbage"}, "unreadable"),
    ],
)
def test_signer_refuses_malformed_or_unauthorised_requests(
    signer: enroll.Signer, request_doc: object, why: str
) -> None:
    with pytest.raises(enroll.Refused, match=why):
        signer.sign(request_doc)


def test_signer_refuses_bad_node_names_and_other_keys(signer: enroll.Signer) -> None:
    for node, why in [("../n1", "invalid node name"), ("ca", "reserved")]:
        with pytest.raises(enroll.Refused, match=why):
            signer.sign(_request(_csr(node)[0]))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(enroll.Refused, match="P-256"):
        signer.sign(_request(_csr("n1", p384)[0]))


def test_signer_pins_the_first_key_of_a_node(signer: enroll.Signer) -> None:
    csr, key = _csr("n1")
    signer.sign(_request(csr))
    signer.sign(_request(_csr("n1", key)[0]))  # the same key again: a renewal
    with pytest.raises(enroll.Refused, match="enrolled with another key"):
        signer.sign(_request(_csr("n1")[0]))
    (signer.pins_dir / "n1.pub").unlink()  # what an operator does for a rebuilt node
    signer.sign(_request(_csr("n1")[0]))


def test_answer_never_raises_on_bad_input(signer: enroll.Signer) -> None:
    assert "error" in enroll.answer(signer, b"{not json", "test")
    csr, _ = _csr("n2")
    assert "cert" in enroll.answer(signer, json.dumps(_request(csr)).encode(), "test")


# --- enrolment over TLS ----------------------------------------------------------------------


class _Counting:
    """A signer server in a thread, counting the requests it answered."""

    def __init__(self, signer: enroll.Signer, context: ssl.SSLContext) -> None:
        self.count = 0
        outer = self

        class Server(enroll.SignerServer):
            def finish_request(self, request: Any, client_address: Any) -> None:
                outer.count += 1
                super().finish_request(request, client_address)

        self.server = Server(HostPort("127.0.0.1", 0), signer, context)
        self.address = HostPort("127.0.0.1", self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def served(signer: enroll.Signer, tmp_path: Path) -> Iterator[_Counting]:
    work = tmp_path / "signer-work"
    work.mkdir()
    server = _Counting(signer, enroll.signer_context(signer.ca, work))
    yield server
    server.close()


def _settings(tmp_path: Path, ca_dir: Path, address: HostPort, **kw: Any) -> enroll.EnrollSettings:
    join = tmp_path / "join"
    join.write_bytes(TOKEN + b"\n")
    defaults: dict[str, Any] = {
        "node": "n1", "pki_dir": tmp_path / "node-pki", "ca_file": ca_dir / pki.CA_CERT,
        "join_file": join, "signer": address, "wait": 5.0,
    }
    return enroll.EnrollSettings(**(defaults | kw))


def test_enroll_makes_a_key_that_stays_and_a_certificate_the_agent_accepts(
    served: _Counting, ca_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, ca_dir, served.address)
    assert "enrolled (no certificate yet)" in enroll.enroll(settings)
    creds = pki.load_node(settings.pki_dir, "n1")
    assert stat.S_IMODE(creds.key.stat().st_mode) == 0o600
    assert (settings.pki_dir / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    key_before = creds.key.read_bytes()
    assert "nothing to do" in enroll.enroll(settings)
    assert served.count == 1  # a current certificate needs no signer
    renew = _settings(tmp_path, ca_dir, served.address, renew_days=400)
    assert "expires in" in enroll.enroll(renew)
    assert served.count == 2
    assert creds.key.read_bytes() == key_before  # renewed for the same key


def test_enroll_again_when_the_ca_changes(
    served: _Counting, ca_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, ca_dir, served.address)
    enroll.enroll(settings)
    other = tmp_path / "other-ca"
    pki.init_ca(other, CLUSTER)
    rotated = _settings(tmp_path, ca_dir, served.address, ca_file=other / pki.CA_CERT, wait=0)
    # The signer still has the old CA: it cannot prove itself to the new one.
    with pytest.raises(PkiError, match="enrol with the signer"):
        enroll.enroll(rotated)
    assert (settings.pki_dir / "ca.crt").read_bytes() == (other / "ca.crt").read_bytes()


def test_enroll_refuses_a_server_that_is_not_the_signer(
    ca_dir: Path, tmp_path: Path, signer: enroll.Signer
) -> None:
    pki.issue(ca_dir, ["n9"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca_dir / "n9.crt", ca_dir / "n9.key")  # a node, not the signer
    impostor = _Counting(signer, context)
    try:
        with pytest.raises(PkiError, match="is not the signer of cluster alpha"):
            enroll.enroll(_settings(tmp_path, ca_dir, impostor.address, wait=0))
    finally:
        impostor.close()
    assert not (tmp_path / "node-pki" / "n1.crt").exists()


def test_enroll_reports_a_refusal_at_once(
    served: _Counting, ca_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, ca_dir, served.address)
    settings.join_file.write_bytes(b"not-the-token-not-the-token")
    with pytest.raises(enroll.Refused, match="wrong join token"):
        enroll.enroll(settings)
    assert served.count == 1


def test_enroll_retries_an_unreachable_signer_until_the_wait_runs_out(
    ca_dir: Path, tmp_path: Path
) -> None:
    now = [0.0]
    calls: list[float] = []

    def refuse(*_: object) -> Mapping[str, Any]:
        calls.append(now[0])
        raise ConnectionRefusedError(111, "Connection refused")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    settings = _settings(tmp_path, ca_dir, HostPort("127.0.0.1", 1), wait=20.0)
    with pytest.raises(PkiError, match="Connection refused"):
        enroll.enroll(settings, request=refuse, clock=lambda: now[0], sleep=sleep)
    assert calls[:4] == [0.0, 0.5, 1.5, 3.5]  # backoff doubles, capped at 5 s
    assert calls[-1] <= 20.0 and len(calls) < 10


def test_enroll_checks_the_cluster_and_the_node_name(
    ca_dir: Path, tmp_path: Path
) -> None:
    address = HostPort("127.0.0.1", 1)
    with pytest.raises(PkiError, match="set for 'beta'"):
        enroll.enroll(_settings(tmp_path, ca_dir, address, cluster="beta"))
    with pytest.raises(PkiError, match="invalid node name"):
        enroll.enroll(_settings(tmp_path, ca_dir, address, node="bad/name"))
    assert not list((tmp_path / "node-pki").glob("*.key"))


# --- the commands ----------------------------------------------------------------------------


def test_enroll_command(served: _Counting, ca_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, ca_dir, served.address)
    args = ["pki", "enroll", "--node-id", "n7", "--pki-dir", str(settings.pki_dir),
            "--ca-file", str(settings.ca_file), "--join-file", str(settings.join_file),
            "--signer", str(served.address)]
    result = CliRunner().invoke(app, args, env={"MESH_CLUSTER": CLUSTER})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("n7: enrolled (no certificate yet)")
    pki.load_node(settings.pki_dir, "n7")
    wrong = CliRunner().invoke(app, args, env={"MESH_CLUSTER": "beta"})
    assert wrong.exit_code == 1
    assert wrong.output.strip().splitlines() == [
        "error: the CA is cluster 'alpha', the agent is set for 'beta'"
    ]


def test_signer_command_fails_in_one_line_without_the_ca_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "pki", "signer", "--ca-cert", str(tmp_path / "ca.crt"),
        "--ca-key", str(tmp_path / "ca.key"), "--join-file", str(tmp_path / "join"),
    ])
    assert result.exit_code == 1
    assert result.output.startswith("error: read certificate")
    assert len(result.output.strip().splitlines()) == 1
