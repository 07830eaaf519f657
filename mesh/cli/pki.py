"""``mesh pki``: make and inspect the cluster CA and the node certificates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mesh import pki
from mesh.errors import PkiError

pki_app = typer.Typer(
    name="pki",
    help="Make and inspect the cluster CA and the node keys and certificates.",
    no_args_is_help=True,
    add_completion=False,
)

PkiDir = Annotated[
    Path,
    typer.Option(
        "--dir",
        envvar="MESH_PKI_DIR",
        help="Directory of ca.crt, ca.key and one NODE.crt + NODE.key per node.",
    ),
]
DEFAULT_DIR = Path("pki")


def _days(help_text: str) -> Any:
    return typer.Option("--days", min=1, help=help_text)


@contextmanager
def operator_errors() -> Iterator[None]:
    """Report a PkiError as one line and exit 1: the operator caused it and can fix it
    from the message; a traceback would only bury it."""
    try:
        yield
    except PkiError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@pki_app.command()
def init(
    cluster: Annotated[
        str, typer.Option("--cluster", help="Cluster name: lowercase letters, digits and '-'.")
    ],
    pki_dir: PkiDir = DEFAULT_DIR,
    days: Annotated[int, _days("Days the CA certificate stays valid.")] = 3650,
) -> None:
    """Create the cluster CA (ca.crt, ca.key); never overwrites an existing one."""
    with operator_errors():
        cert = pki.init_ca(pki_dir, cluster, days=days)
    typer.echo(f"CA of cluster {cluster}: {cert} (key {cert.with_suffix('.key')}, mode 0600)")


@pki_app.command()
def issue(
    nodes: Annotated[
        list[str], typer.Argument(metavar="NODE...", help="Node ids to issue a certificate to.")
    ],
    pki_dir: PkiDir = DEFAULT_DIR,
    dns: Annotated[
        list[str] | None,
        typer.Option("--dns", help="Extra DNS name for every certificate (repeatable)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="Extra IP address for every certificate (repeatable)."),
    ] = None,
    days: Annotated[int, _days("Days each node certificate stays valid.")] = 825,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a node's existing key and certificate.")
    ] = False,
) -> None:
    """Issue a key and a certificate per node, signed by the cluster CA."""
    with operator_errors():
        certs = pki.issue(
            pki_dir, nodes, days=days, dns_names=dns or (), ip_addresses=ip or (), overwrite=force
        )
    for cert in certs:
        typer.echo(f"issued {cert.stem}: {cert}, {cert.with_suffix('.key')}")


@pki_app.command()
def show(
    pki_dir: PkiDir = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the certificates in the PKI directory, their identity and expiry."""
    with operator_errors():
        infos = pki.show(pki_dir)
    now = datetime.now(UTC)
    if as_json:
        typer.echo(json.dumps([_as_json(info, now) for info in infos], indent=2))
    else:
        Console().print(_table(pki_dir, infos, now))


def _days_left(info: pki.CertInfo, now: datetime) -> int:
    return (info.not_after - now).days


def _as_json(info: pki.CertInfo, now: datetime) -> dict[str, object]:
    return {
        "file": str(info.path),
        "kind": "ca" if info.is_ca else "node",
        "identity": info.identity.uri if info.identity else None,
        "subject": info.subject,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "days_left": _days_left(info, now),
        "expired": info.not_after < now,
        "fingerprint_sha256": info.fingerprint_sha256,
        "has_key": info.has_key,
    }


def _table(pki_dir: Path, infos: list[pki.CertInfo], now: datetime) -> Table:
    table = Table(title=f"PKI in {pki_dir}")
    table.add_column("file")
    table.add_column("kind")
    # fold, not ellipsis: an operator copies identities from here into config
    table.add_column("identity", overflow="fold")
    table.add_column("not after (UTC)")
    table.add_column("days left", justify="right")
    table.add_column("key")
    for info in infos:
        left = _days_left(info, now)
        table.add_row(
            info.path.name,
            "CA" if info.is_ca else "node",
            info.identity.uri if info.identity else info.subject,
            f"{info.not_after:%Y-%m-%d %H:%M}",
            "[bold red]EXPIRED[/]" if info.not_after < now else str(left),
            "yes" if info.has_key else "[yellow]no[/]",
        )
    return table
