"""``mesh pki swarm-secrets``, ``mesh pki enroll`` and ``mesh pki signer``: the PKI of a
Swarm deployment (compose/stack.yml; README, "Swarm"). Register with ``register(pki_app)``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from mesh import config, pki
from mesh.cli.pki import DEFAULT_DIR, PkiDir, operator_errors
from mesh.config.values import HostPort
from mesh.deploy import swarm
from mesh.errors import ConfigError, PkiError
from mesh.pki import enroll

_SECRETS = Path("/run/secrets")
_SIGNER_STATE = Path("/var/lib/meshsync-signer")


def _file(flag: str, env: str, help_text: str) -> Any:
    return typer.Option(flag, envvar=env, help=help_text, show_default=True)


def swarm_secrets(
    pki_dir: PkiDir = DEFAULT_DIR,
    version: Annotated[str, typer.Option(
        "--version", help="Secret set version; deploy it with MESH_SECRETS=<version>.")
    ] = swarm.DEFAULT_VERSION,
    prefix: Annotated[str, typer.Option(
        "--prefix", help="Secret name prefix (MESH_SECRETS_PREFIX at deploy).")
    ] = swarm.DEFAULT_PREFIX,
    docker: Annotated[str, typer.Option(
        "--docker", help="The docker command; DOCKER_HOST or the context picks the manager.")
    ] = "docker",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the secrets that would be made; make none.")] = False,
) -> None:
    """Create the Swarm secrets compose/stack.yml expects, from the CA in --dir.

    The CA certificate and key and a new join token; no node keys: each node makes its
    own and enrols with the signer."""
    with operator_errors():
        planned = swarm.plan(pki_dir, prefix=prefix, version=version)
        if not dry_run:
            swarm.create(planned, docker=docker.split())
    for secret in planned:
        typer.echo(f"{'would create' if dry_run else 'created'} secret {secret.name}")
    env = f"MESH_SECRETS={version}" + (f" MESH_SECRETS_PREFIX={prefix}"
                                       if prefix != swarm.DEFAULT_PREFIX else "")
    typer.echo(f"deploy with: {env} docker stack deploy -c compose/stack.yml mesh")


def enroll_command(
    node_id: Annotated[str | None, typer.Option(
        "--node-id", help="This node's id (env MESH_NODE_ID; default: the hostname).",
        show_default=False)] = None,
    pki_out: Annotated[str | None, typer.Option(
        "--pki-dir", help="Where the agent reads its key and certificates (env MESH_PKI_DIR).",
        show_default=False)] = None,
    ca_file: Annotated[Path, _file(
        "--ca-file", "MESH_CA_FILE", "The CA certificate.")] = _SECRETS / "meshsync-ca.crt",
    join_file: Annotated[Path, _file(
        "--join-file", "MESH_JOIN_FILE", "The join token.")] = _SECRETS / "meshsync-join",
    signer: Annotated[str, typer.Option(
        "--signer", envvar="MESH_SIGNER", help="The signer's HOST[:PORT].")] = "signer",
    wait: Annotated[float, typer.Option(
        "--wait", min=0, help="Seconds to keep trying to reach the signer.")] = 120.0,
    renew_days: Annotated[int, typer.Option(
        "--renew-days", min=0, help="Enrol again when the certificate expires sooner.")] = 30,
) -> None:
    """Make this node's key once and have the signer certify it; run before `mesh agent`.

    The key never leaves the node. Nothing is asked when the certificate in the PKI
    directory is current, issued by the CA and for this key."""
    with operator_errors():
        try:
            agent = config.load({"node_id": node_id, "pki_dir": pki_out}, os.environ,
                                hostname=socket.gethostname())
            address = HostPort.parse(signer, default_port=enroll.SIGNER_PORT, min_port=1)
        except ConfigError as err:
            raise PkiError(str(err)) from None
        settings = enroll.EnrollSettings(
            node=agent.node_id, pki_dir=agent.pki_dir, ca_file=ca_file, join_file=join_file,
            signer=address, wait=wait, renew_days=renew_days, cluster=agent.cluster)
        typer.echo(enroll.enroll(settings))


def signer_command(
    ca_cert: Annotated[Path, _file(
        "--ca-cert", "MESH_CA_FILE", "The CA certificate.")] = _SECRETS / "meshsync-ca.crt",
    ca_key: Annotated[Path, _file(
        "--ca-key", "MESH_CA_KEY_FILE", "The CA key.")] = _SECRETS / "meshsync-ca.key",
    join_file: Annotated[Path, _file(
        "--join-file", "MESH_JOIN_FILE", "The join token.")] = _SECRETS / "meshsync-join",
    listen: Annotated[str, typer.Option(
        "--listen", envvar="MESH_SIGNER_LISTEN", help="Address to serve enrolments on.")
    ] = f"0.0.0.0:{enroll.SIGNER_PORT}",
    state_dir: Annotated[Path, _file(
        "--state-dir", "MESH_SIGNER_STATE_DIR", "Where the pinned node keys are kept.")
    ] = _SIGNER_STATE,
    days: Annotated[int, typer.Option(
        "--days", min=1, help="Days each node certificate stays valid.")] = 365,
) -> None:
    """Certify the keys of enrolling nodes that hold the join token; runs until stopped.

    The only process that needs the CA key; it pins the first key of each node id."""
    from mesh import logs  # the agent's log format, for one `docker service logs` view

    with operator_errors():
        try:
            address = HostPort.parse(listen)
        except ConfigError as err:
            raise PkiError(f"--listen: {err}") from None
        logs.setup("signer", "json" if os.environ.get("MESH_LOG_FORMAT") == "json" else "human")
        signer = enroll.Signer(pki.load_ca(ca_cert, ca_key), enroll.read_token(join_file),
                               state_dir / "pins", days=days)
        try:
            enroll.run_signer(signer, address)
        except OSError as err:
            raise PkiError(f"serve on {address}: {err.strerror or err}") from None


def register(pki_app: typer.Typer) -> None:
    pki_app.command("swarm-secrets")(swarm_secrets)
    pki_app.command("enroll")(enroll_command)
    pki_app.command("signer")(signer_command)
