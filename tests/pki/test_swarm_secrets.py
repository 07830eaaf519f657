"""``mesh pki swarm-secrets`` (mesh/deploy/swarm.py): the secrets compose/stack.yml expects.

The docker CLI is replaced by a recorder here; tests/e2e runs the real one on a Swarm.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mesh import pki
from mesh.cli import app
from mesh.deploy import swarm
from mesh.errors import PkiError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory, "prod")
    pki.issue(directory, ["n1"])
    return directory


class FakeDocker:
    """Records ``docker secret`` calls; ``existing`` names answer ``inspect`` with 0."""

    def __init__(self, existing: set[str] | None = None, fail_create: bool = False) -> None:
        self.existing = set(existing or ())
        self.fail_create = fail_create
        self.created: dict[str, tuple[bytes, list[str]]] = {}

    def __call__(
        self, argv: list[str], *, input: bytes, **_: Any
    ) -> subprocess.CompletedProcess[bytes]:
        verb = argv[argv.index("secret") + 1]
        name = argv[-2] if verb == "create" else argv[-1]
        if verb == "inspect":
            return subprocess.CompletedProcess(argv, 0 if name in self.existing else 1, b"", b"")
        if self.fail_create:
            why = b"Error: this node is not a swarm manager"
            return subprocess.CompletedProcess(argv, 1, b"", why)
        labels = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--label"]
        self.created[name] = (input, labels)
        return subprocess.CompletedProcess(argv, 0, b"", b"")


def test_plan_holds_the_ca_and_a_fresh_token_and_no_node_key(ca_dir: Path) -> None:
    planned = swarm.plan(ca_dir, version="v3")
    by_name = {s.name: s for s in planned}
    assert list(by_name) == ["meshsync-v3-ca.crt", "meshsync-v3-ca.key", "meshsync-v3-join"]
    assert by_name["meshsync-v3-ca.crt"].data == (ca_dir / "ca.crt").read_bytes()
    assert by_name["meshsync-v3-ca.key"].data == (ca_dir / "ca.key").read_bytes()
    token = by_name["meshsync-v3-join"].data
    assert len(token.strip()) >= 40 and token != swarm.plan(ca_dir)[2].data
    node_key = (ca_dir / "n1.key").read_bytes()
    assert all(node_key != s.data for s in planned)
    assert planned[0].labels == (("meshsync.cluster", "prod"), ("meshsync.version", "v3"))
    assert "BEGIN" not in repr(planned)  # a key never lands in a log by accident


def test_plan_refuses_a_bad_version_or_a_broken_ca(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(swarm.SwarmError, match="invalid version"):
        swarm.plan(ca_dir, version="v 2")
    with pytest.raises(swarm.SwarmError, match="invalid prefix"):
        swarm.plan(ca_dir, prefix="-x")
    (ca_dir / "ca.key").write_bytes((ca_dir / "n1.key").read_bytes())
    with pytest.raises(PkiError, match="is not the private key of"):
        swarm.plan(ca_dir)
    with pytest.raises(PkiError, match="read certificate"):
        swarm.plan(tmp_path / "nowhere")


def test_create_makes_each_secret_with_its_labels(ca_dir: Path) -> None:
    docker = FakeDocker()
    planned = swarm.plan(ca_dir)
    swarm.create(planned, docker=["docker", "-H", "unix:///x.sock"], run=docker)
    assert set(docker.created) == {s.name for s in planned}
    data, labels = docker.created["meshsync-v1-ca.crt"]
    assert data == (ca_dir / "ca.crt").read_bytes()
    assert labels == ["meshsync.cluster=prod", "meshsync.version=v1"]


def test_create_refuses_before_making_any_if_one_exists(ca_dir: Path) -> None:
    docker = FakeDocker(existing={"meshsync-v1-join"})
    with pytest.raises(swarm.SwarmError, match="exist already: meshsync-v1-join"):
        swarm.create(swarm.plan(ca_dir), run=docker)
    assert docker.created == {}


def test_create_reports_docker_in_one_line(ca_dir: Path) -> None:
    with pytest.raises(swarm.SwarmError, match="not a swarm manager"):
        swarm.create(swarm.plan(ca_dir), run=FakeDocker(fail_create=True))
    with pytest.raises(swarm.SwarmError, match="no-such-docker"):
        swarm.create(swarm.plan(ca_dir), docker=["/no-such-docker"])


def test_the_stack_uses_the_names_the_command_makes() -> None:
    stack = (ROOT / "compose" / "stack.yml").read_text()
    # What `docker stack deploy` does with ${VAR:-default} when VAR is not set.
    rendered = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", stack)
    names = set(re.findall(r"name: (\S+)", rendered))
    assert {swarm.secret_name(kind) for kind in swarm.KINDS} <= names


def _fake_docker_script(tmp_path: Path) -> Path:
    """A `docker` that logs its argv and stdin, and knows no secret yet."""
    script = tmp_path / "docker"
    log = tmp_path / "docker.log"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "if sys.argv[2] == 'inspect':\n"
        "    sys.exit(1)\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + ' ' + str(len(sys.stdin.buffer.read())) + '\\n')\n"
    )
    script.chmod(0o755)
    return script


def test_command(ca_dir: Path, tmp_path: Path) -> None:
    docker = _fake_docker_script(tmp_path)
    args = ["pki", "swarm-secrets", "--dir", str(ca_dir), "--docker", str(docker)]
    result = CliRunner().invoke(app, [*args, "--version", "v2"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "created secret meshsync-v2-ca.crt",
        "created secret meshsync-v2-ca.key",
        "created secret meshsync-v2-join",
        "deploy with: MESH_SECRETS=v2 docker stack deploy -c compose/stack.yml mesh",
    ]
    calls = (tmp_path / "docker.log").read_text().splitlines()
    assert calls[0].startswith("secret create --label meshsync.cluster=prod --label "
                               "meshsync.version=v2 meshsync-v2-ca.crt - ")
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--prefix", "acme"])
    assert dry.exit_code == 0
    assert dry.output.splitlines()[0] == "would create secret acme-v1-ca.crt"
    assert "MESH_SECRETS_PREFIX=acme" in dry.output
    assert len((tmp_path / "docker.log").read_text().splitlines()) == 3


def test_command_fails_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pki", "swarm-secrets", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("error: read certificate")
    assert len(result.output.strip().splitlines()) == 1
