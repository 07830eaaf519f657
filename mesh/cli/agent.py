"""``mesh agent``: run this node's agent.

Register with ``app.command("agent")(agent)``. Typer reads no env var here:
every option defaults to None ("not given") and ``mesh.config.load`` applies
flags > ``MESH_*`` env > config file > defaults, so the precedence lives in one
place and the errors read the same whichever source was wrong.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Any

import typer

from mesh import config
from mesh.errors import ConfigError


def _option(name: str) -> Any:
    setting = config.SETTINGS[name]
    return typer.Option(
        setting.flag, help=config.help_text(name), metavar=setting.metavar, show_default=False
    )


def agent(
    node_id: Annotated[str | None, _option("node_id")] = None,
    cluster: Annotated[str | None, _option("cluster")] = None,
    data_dir: Annotated[str | None, _option("data_dir")] = None,
    state_dir: Annotated[str | None, _option("state_dir")] = None,
    pki_dir: Annotated[str | None, _option("pki_dir")] = None,
    listen: Annotated[str | None, _option("listen")] = None,
    tunnel_listen: Annotated[str | None, _option("tunnel_listen")] = None,
    advertise: Annotated[str | None, _option("advertise")] = None,
    peers: Annotated[str | None, _option("peers")] = None,
    dns_interval: Annotated[str | None, _option("dns_interval")] = None,
    metrics_listen: Annotated[str | None, _option("metrics_listen")] = None,
    lsyncd_delay: Annotated[str | None, _option("lsyncd_delay")] = None,
    lsyncd_pace: Annotated[str | None, _option("lsyncd_pace")] = None,
    batch_quiet: Annotated[str | None, _option("batch_quiet")] = None,
    batch_cap: Annotated[str | None, _option("batch_cap")] = None,
    max_clock_skew: Annotated[str | None, _option("max_clock_skew")] = None,
    stalled_after: Annotated[str | None, _option("stalled_after")] = None,
    keep_for: Annotated[str | None, _option("keep_for")] = None,
    keep_max: Annotated[str | None, _option("keep_max")] = None,
    forget_after: Annotated[str | None, _option("forget_after")] = None,
    log_format: Annotated[str | None, _option("log_format")] = None,
    log_level: Annotated[str | None, _option("log_level")] = None,
    config_file: Annotated[str | None, _option("config_file")] = None,
) -> None:
    """Run this node's agent until it is stopped (SIGTERM or SIGINT)."""
    # Options are taken as text and parsed by mesh.config, not by typer, so that a bad
    # value gets the same one-line error from a flag, an env var or the file.
    flags: dict[str, object | None] = {
        "node_id": node_id,
        "cluster": cluster,
        "data_dir": data_dir,
        "state_dir": state_dir,
        "pki_dir": pki_dir,
        "listen": listen,
        "tunnel_listen": tunnel_listen,
        "advertise": advertise,
        "peers": peers,
        "dns_interval": dns_interval,
        "metrics_listen": metrics_listen,
        "lsyncd_delay": lsyncd_delay,
        "lsyncd_pace": lsyncd_pace,
        "batch_quiet": batch_quiet,
        "batch_cap": batch_cap,
        "max_clock_skew": max_clock_skew,
        "stalled_after": stalled_after,
        "keep_for": keep_for,
        "keep_max": keep_max,
        "forget_after": forget_after,
        "log_format": log_format,
        "log_level": log_level,
        "config_file": config_file,
    }
    try:
        agent_config = config.load(flags, os.environ, hostname=socket.gethostname())
    except ConfigError as err:
        # The operator can fix this from the message; a traceback would bury it.
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    # Imported here: mesh.engine.agent pulls in the broker, the store and the rest of the node,
    # which neither `mesh agent --help` nor a config error needs.
    from mesh.engine.agent import run_agent

    code = run_agent(agent_config)
    if code:
        raise typer.Exit(code)


def run_alone(args: list[str]) -> None:
    """``mesh agent ARGS`` with no other command built (``mesh.cli.main``); the same
    command, help and errors as through the whole ``mesh`` app."""
    alone = typer.Typer(add_completion=False)
    alone.command()(agent)
    alone(args=args, prog_name="mesh agent")
