"""The agent's configuration: typed, validated, with defaults that work.

Each setting comes from, in order of precedence: a command-line flag, an env
var ``MESH_<NAME>``, a key of the TOML config file, its default (STYLE.md rule
5; uvicorn's ``Config`` is the model). ``load`` applies that order;
``AgentConfig`` checks itself, so a config built in a test is as safe as one
built from a command line. Every error is a ``ConfigError`` of one line naming
the setting, where the value came from, the value and what was expected.

An empty env var counts as not set: compose files often pass ``MESH_X: ""``
for "nothing here". A flag given as an empty string is a value (``--peers ""``
clears the peers of the file).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Final, Literal

from mesh.config.values import (
    BROKER_PORT,
    FIRST_ALNUM,
    TUNNEL_PORT,
    WILDCARDS,
    HostPort,
    PeerSpec,
    absolute_path,
    advertise_host,
    listen_address,
    matching,
    metrics_address,
    one_of,
    optional_path,
    peer_list,
    seconds,
    size_cap,
    span,
    tunnel_address,
)
from mesh.core.paths import KEEP_NAME
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import ConfigError, LocalProtocolError
from mesh.names import CLUSTER_PATTERN

LogFormat = Literal["human", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

DEFAULT_CONFIG_FILE: Final = Path("/etc/meshsync/agent.toml")
# The cluster part of the certificates' identity.
CLUSTER_RE: Final = re.compile(CLUSTER_PATTERN)


# Checks: each takes a raw value (a string from a flag or env var, a TOML value, or
# the typed value itself) and returns the typed value, or raises a ConfigError.


@dataclass(frozen=True, slots=True)
class Setting:
    """How one setting is named on each source, its help, and its check."""

    name: str
    help: str
    check: Callable[[object], object]
    metavar: str
    flag: str
    env: str
    default_note: str | None = None

    def apply(self, value: object, source: str | None = None) -> Any:
        """Check ``value``; an error names this setting and, if known, its source."""
        try:
            return self.check(value)
        except ConfigError as err:
            where = f"{self.name} ({source})" if source else self.name
            raise ConfigError(f"{where}: {err}") from err


def _setting(
    name: str,
    help: str,
    check: Callable[[object], object],
    metavar: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    default_note: str | None = None,
) -> Setting:
    return Setting(
        name,
        help,
        check,
        metavar,
        flag or "--" + name.replace("_", "-"),
        env or "MESH_" + name.upper(),
        default_note,
    )


SETTINGS: Final[Mapping[str, Setting]] = {
    s.name: s
    for s in (
        _setting(
            "node_id",
            "This node's id, as in its certificate.",
            matching(NODE_ID_RE, "1-64 letters, digits, '.', '_' or '-'" + FIRST_ALNUM),
            "ID",
            default_note="the hostname",
        ),
        _setting(
            "cluster",
            "Cluster name, as in the CA certificate.",
            matching(CLUSTER_RE, "1-63 lowercase letters, digits or '-'" + FIRST_ALNUM),
            "NAME",
        ),
        _setting("data_dir", "The directory kept in sync.", absolute_path, "DIR"),
        _setting("state_dir", "Index database, gate socket, status.", absolute_path, "DIR"),
        _setting("pki_dir", "ca.crt and this node's NODE.crt and NODE.key.", absolute_path, "DIR"),
        _setting("listen", "MQTTS broker address (port 0: any free).", listen_address, "HOST:PORT"),
        _setting(
            "tunnel_listen",
            "rsync-over-TLS listener; ':PORT' takes listen's host.",
            tunnel_address,
            "[HOST]:PORT",
            default_note="listen's host, port 8873",
        ),
        _setting("advertise", "Host the peers should use for this node.", advertise_host, "HOST"),
        _setting(
            "peers",
            "Comma-separated HOST[:PORT] or dns:NAME[:PORT] (port 8883 if left out).",
            peer_list,
            "LIST",
        ),
        _setting(
            "dns_interval",
            "Seconds between DNS re-resolutions.",
            seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "metrics_listen", "Prometheus metrics address, or 'off'.", metrics_address, "HOST:PORT"
        ),
        _setting(
            "lsyncd_delay",
            "lsyncd's batching delay in seconds: 0 pushes a change at once, and what "
            "changes while a push runs goes in the next batch.",
            seconds(positive=False),
            "SECONDS",
        ),
        _setting(
            "lsyncd_pace",
            "While this node changes more than 6 paths a second, the shortest time in "
            "seconds between the starts of two of lsyncd's pushes to one peer: what "
            "changes sooner waits and goes with the rest in one push; a sparser node's "
            "change goes at once. 0: no pacing.",
            seconds(positive=False),
            "SECONDS",
        ),
        _setting(
            "batch_quiet", "Change batch: seconds of quiet before the watcher scans.",
            seconds(positive=False), "SECONDS"
        ),
        _setting(
            "batch_cap",
            "Change batch: longest wait, seconds, before the watcher scans.",
            seconds(positive=False),
            "SECONDS",
        ),
        _setting(
            "max_clock_skew",
            "Seconds a peer's clock stamp may be ahead of this node's clock; writes stamped "
            "further ahead are refused, with a log line (a clock that far off, or a lie).",
            seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "stalled_after",
            "Seconds after which content a peer announced and never delivered, or a queue "
            "to a peer that does not move, is reported as stalled and stops counting "
            "against `mesh health`.",
            seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "keep_for",
            "How long replaced and deleted versions stay in the keep area once every "
            "known node holds something newer (`mesh versions`, `mesh restore`); 0: only "
            "as long as a pending restore or conflict copy needs them.",
            span,
            "DURATION",
            default_note="7d",
        ),
        _setting(
            "keep_max",
            "Size cap of the keep area, oldest versions collected first (never what a "
            "pending restore needs): bytes (5G) or a percentage of the volume (10%); 0: "
            "none.",
            size_cap,
            "SIZE|N%",
            default_note="10%",
        ),
        _setting(
            "forget_after",
            "This node's running time without hearing a peer after which tombstones no "
            "longer wait for that peer's acknowledgement; a version it brings back of "
            "what was deleted meanwhile is deleted again.",
            span,
            "DURATION",
            default_note="30d",
        ),
        _setting("log_format", "Log format.", one_of("human", "json"), "human|json"),
        _setting(
            "log_level",
            "Log level.",
            one_of("debug", "info", "warning", "error", "critical"),
            "LEVEL",
        ),
        _setting(
            "config_file",
            "TOML file of settings (keys as the flags, with '_').",
            optional_path,
            "FILE",
            flag="--config",
            env="MESH_CONFIG",
            default_note=f"{DEFAULT_CONFIG_FILE} if it exists",
        ),
    )
}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything one agent needs to know; checks itself when built."""

    node_id: str
    cluster: str = "meshsync"
    data_dir: Path = Path("/data")
    state_dir: Path = Path("/var/lib/meshsync")
    pki_dir: Path = Path("/run/secrets/meshsync")
    listen: HostPort = HostPort("0.0.0.0", BROKER_PORT)  # noqa: S104 - a broker for the mesh
    # Empty host: listen's host (filled in by __post_init__, never empty afterwards).
    tunnel_listen: HostPort = HostPort("", TUNNEL_PORT)
    advertise: str | None = None
    peers: tuple[PeerSpec, ...] = ()
    dns_interval: float = 10.0
    metrics_listen: HostPort | None = HostPort("127.0.0.1", 9108)
    # lsyncd carries this node's writes (issue 12). At 0 a change goes at once, and the
    # changes made while a push to a peer runs make its next batch.
    lsyncd_delay: float = 0.0
    # ... and a busy node's pushes to a peer start at most this often: each costs both
    # ends processes and a TLS handshake (issue 12, docs/DESIGN.md "Who pushes").
    lsyncd_pace: float = 0.4
    batch_quiet: float = 0.02  # inotify quiet before a scan; pushes in flight batch the rest
    batch_cap: float = 0.5
    # Issue 13: bounds on what one peer can do to this node's clock and health.
    max_clock_skew: float = 300.0
    stalled_after: float = 300.0
    # Issue 14: the keep area's retention and cap; when an absent peer stops counting.
    keep_for: float = 7 * 86400.0
    keep_max: tuple[float, str] = (10.0, "%")
    forget_after: float = 30 * 86400.0
    log_format: LogFormat = "human"
    log_level: LogLevel = "info"
    config_file: Path | None = None  # the file that was read, if any

    def __post_init__(self) -> None:
        for setting in SETTINGS.values():
            checked = setting.apply(getattr(self, setting.name))
            object.__setattr__(self, setting.name, checked)
        if not self.tunnel_listen.host:
            tunnel = HostPort(self.listen.host, self.tunnel_listen.port)
            object.__setattr__(self, "tunnel_listen", tunnel)
        if self.batch_quiet > self.batch_cap:
            raise ConfigError(
                f"batch_quiet: {self.batch_quiet:g} is invalid; expected at most "
                f"batch_cap ({self.batch_cap:g})"
            )
        self._check_listeners_apart()

    def _check_listeners_apart(self) -> None:
        seen: list[tuple[str, HostPort]] = [("listen", self.listen)]
        for name in ("tunnel_listen", "metrics_listen"):
            address: HostPort | None = getattr(self, name)
            if address is None or address.port == 0:
                continue
            for other_name, other in seen:
                same_host = address.host == other.host or {address.host, other.host} & WILDCARDS
                if address.port == other.port and same_host:
                    raise ConfigError(
                        f"{name}: {str(address)!r} is invalid; expected a port other "
                        f"than {other_name}'s ({other})"
                    )
            seen.append((name, address))

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def gate_socket(self) -> Path:
        return self.state_dir / "gate.sock"

    @property
    def keep_dir(self) -> Path:
        """Where pushes keep what they replace (DESIGN.md, "The race to design for")."""
        return self.data_dir / KEEP_NAME

    @property
    def status_file(self) -> Path:
        return self.state_dir / "agent.json"


def default_text(name: str) -> str:
    """How the default of setting ``name`` reads in ``--help``."""
    setting = SETTINGS[name]
    if setting.default_note is not None:
        return setting.default_note
    default = next(f.default for f in fields(AgentConfig) if f.name == name)
    if default is None or default == () or default is MISSING:
        return "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def help_text(name: str) -> str:
    """The ``--help`` line of setting ``name``: what it is, its env var, its default."""
    setting = SETTINGS[name]
    return f"{setting.help} (env {setting.env}; default: {default_text(name)})"


def load(
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    *,
    hostname: str,
    default_config_file: Path | None = None,
) -> AgentConfig:
    """Build the config from flags > env > file > defaults.

    ``flags`` maps setting names to values, None meaning "not given". The config
    file is ``config_file`` from the flags or ``MESH_CONFIG``; if neither names
    one, ``default_config_file`` (``DEFAULT_CONFIG_FILE`` if None) is read when it exists.
    """
    unknown = set(flags) - set(SETTINGS)
    if unknown:
        raise LocalProtocolError(f"load: unknown flags {sorted(unknown)}")
    path, file_values = _config_file(flags, env, default_config_file or DEFAULT_CONFIG_FILE)
    values: dict[str, Any] = {"config_file": path}
    for setting in SETTINGS.values():
        if setting.name == "config_file":
            continue
        if (flag := flags.get(setting.name)) is not None:
            values[setting.name] = setting.apply(flag, setting.flag)
        elif env.get(setting.env):
            values[setting.name] = setting.apply(env[setting.env], setting.env)
        elif setting.name in file_values:
            values[setting.name] = setting.apply(file_values[setting.name], str(path))
        elif setting.name == "node_id":
            values[setting.name] = setting.apply(hostname, "hostname")
    return AgentConfig(**values)


def _config_file(
    flags: Mapping[str, object | None], env: Mapping[str, str], default: Path
) -> tuple[Path | None, dict[str, object]]:
    """The config file to read and its settings; ``(None, {})`` if there is none."""
    setting = SETTINGS["config_file"]
    path: Path
    source: str | None
    if (flag := flags.get("config_file")) is not None:
        path, source = setting.apply(flag, setting.flag), setting.flag
    elif env.get(setting.env):
        path, source = setting.apply(env[setting.env], setting.env), setting.env
    else:
        path, source = default, None
    try:
        with path.open("rb") as file:
            values = tomllib.load(file)
    except FileNotFoundError:
        if source is None:
            return None, {}
        raise ConfigError(f"config_file ({source}): {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: not valid TOML: {err}") from err
    for key in values:
        if key not in SETTINGS or key == "config_file":
            raise ConfigError(f"config file {path}: unknown key {key!r}{_did_you_mean(key)}")
    return path, values


def _did_you_mean(key: str) -> str:
    known = [name for name in SETTINGS if name != "config_file"]
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
