"""The ``mesh`` command, every subcommand (``mesh.cli.main`` builds ``mesh agent`` alone)."""

from __future__ import annotations

import typer

from mesh.cli.agent import agent
from mesh.cli.local import local_app
from mesh.cli.ops import register as register_ops
from mesh.cli.pki import pki_app
from mesh.cli.swarm import register as register_swarm
from mesh.cli.versions import register as register_versions

app = typer.Typer(
    name="mesh",
    help="meshsync: multi-master directory sync for Docker Swarm.",
    no_args_is_help=True,
    add_completion=False,
)
register_swarm(pki_app)
app.add_typer(pki_app, name="pki")
app.command("agent")(agent)
app.add_typer(local_app, name="local")
register_ops(app)
register_versions(app)


@app.command()
def version() -> None:
    """Print the meshsync version."""
    from mesh import __version__

    typer.echo(__version__)
