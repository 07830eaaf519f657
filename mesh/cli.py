"""The ``mesh`` command."""

from __future__ import annotations

import typer

from mesh.cli_agent import agent
from mesh.cli_pki import pki_app

app = typer.Typer(
    name="mesh",
    help="meshsync: multi-master directory sync for Docker Swarm.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(pki_app, name="pki")
app.command("agent")(agent)


@app.command()
def version() -> None:
    """Print the meshsync version."""
    from mesh import __version__

    typer.echo(__version__)


def main() -> None:
    app()
