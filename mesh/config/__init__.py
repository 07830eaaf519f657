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
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path, PurePath
from typing import Any, Final, Literal

from mesh.core.paths import KEEP_NAME
from mesh.core.vclock import NODE_ID_RE
from mesh.errors import ConfigError, LocalProtocolError

LogFormat = Literal["human", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

BROKER_PORT: Final = 8883
TUNNEL_PORT: Final = 8873
DEFAULT_CONFIG_FILE: Final = Path("/etc/meshsync/agent.toml")
# Same pattern as the cluster part of the certificates' identity (mesh/pki/tls.py).
CLUSTER_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAX_SECONDS: Final = 3600.0

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# Swarm names services <stack>_<service>, so tasks.<stack>_<service> has an underscore.
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_FIRST_ALNUM = ", starting with a letter or digit"
_PORT_RE = re.compile(r"[0-9]{1,5}")
_WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - names the bind-all hosts, binds nothing


def _invalid(value: object, expected: str) -> ConfigError:
    return ConfigError(f"{value!r} is invalid; expected {expected}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_host(host: str) -> bool:
    """True for an IP address (IPv6 without brackets) or a DNS host name."""
    if _is_ip(host):
        return True
    # An all-digit last label is a mistyped IPv4 address, not a name (RFC 1123 2.1).
    last_label = host.rstrip(".").rsplit(".")[-1]
    return _HOSTNAME_RE.fullmatch(host) is not None and not last_label.isdigit()


def _parse_port(text: str, port_text: str, low: int) -> int:
    """The port of ``text``, whose port part is ``port_text``; errors show all of ``text``."""
    if _PORT_RE.fullmatch(port_text) is None or not low <= int(port_text) <= 65535:
        raise _invalid(text, f"a port number {low}-65535 after the ':'")
    return int(port_text)


def _check_port(port: object, low: int) -> int:
    if type(port) is not int or not low <= port <= 65535:
        raise _invalid(port, f"a port number {low}-65535")
    return port


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host and a TCP port. IPv6 hosts are kept without brackets.

    Port 0 is accepted here: on a listener it means "any free port" (tests use
    it); peers require 1-65535. An empty host means "not specified" and is
    accepted only where a setting says so (``tunnel_listen``).
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or (self.host and not is_host(self.host)):
            raise _invalid(self.host, "a host name or IP address")
        _check_port(self.port, 0)

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, min_port: int = 0) -> HostPort:
        """Parse ``host:port``, ``[v6]:port``, or without ``:port`` if there is a default."""
        expected = "HOST:PORT" if default_port is None else "HOST[:PORT]"
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or ":" not in host or rest[:1] not in ("", ":"):
                raise _invalid(text, f"{expected} with an IPv6 host in brackets, as [::1]:8883")
            port_text: str | None = rest[1:] if rest else None
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon:
                host, port_text = text, None
            if ":" in host:
                raise _invalid(text, "an IPv6 address in brackets, as [::1]:8883")
        if port_text is None:
            if default_port is None:
                raise _invalid(text, f"{expected}, as 0.0.0.0:8883 or [::]:8883")
            return cls(host, default_port)
        return cls(host, _parse_port(text, port_text, min_port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One entry of ``peers``: a static ``host:port``, or a DNS name to re-resolve.

    ``dns:NAME[:PORT]`` stands for every address the name resolves to; Swarm's
    ``tasks.<service>`` returns one per running task, so one entry finds every node.
    """

    kind: Literal["static", "dns"]
    host: str
    port: int = BROKER_PORT

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dns"):
            raise _invalid(self.kind, "peer kind 'static' or 'dns'")
        if not isinstance(self.host, str) or not is_host(self.host):
            raise _invalid(self.host, "a host name or IP address")
        if self.kind == "dns" and _is_ip(self.host):
            raise _invalid(self.host, "a DNS name after 'dns:', not an IP address")
        _check_port(self.port, 1)

    @classmethod
    def parse(cls, text: str) -> PeerSpec:
        """Parse ``host[:port]``, ``[v6][:port]`` or ``dns:NAME[:PORT]`` (port 8883 if left out)."""
        if text.startswith("dns:"):
            name, colon, port_text = text[4:].partition(":")
            if not name:
                raise _invalid(text, "dns:NAME or dns:NAME:PORT")
            return cls("dns", name, _parse_port(text, port_text, 1) if colon else BROKER_PORT)
        address = HostPort.parse(text, default_port=BROKER_PORT, min_port=1)
        return cls("static", address.host, address.port)

    def __str__(self) -> str:
        if self.kind == "dns":
            return f"dns:{self.host}:{self.port}"
        return str(HostPort(self.host, self.port))


# Checks: each takes a raw value (a string from a flag or env var, a TOML value, or
# the typed value itself) and returns the typed value, or raises a ConfigError.


def _matching(pattern: re.Pattern[str], expected: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and pattern.fullmatch(value) is not None:
            return value
        raise _invalid(value, expected)

    return check


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise _invalid(value, "one of " + ", ".join(choices))

    return check


def _seconds(*, positive: bool) -> Callable[[object], float]:
    expected = f"a number of seconds, {'over 0' if positive else '0'} to {MAX_SECONDS:g}"

    def check(value: object) -> float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _invalid(value, expected) from None
        if isinstance(number, int | float) and not isinstance(number, bool):
            seconds = float(number)
            above_low = seconds > 0 if positive else seconds >= 0
            if above_low and seconds <= MAX_SECONDS:  # False for NaN
                return seconds
        raise _invalid(value, expected)

    return check


_SPAN_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _span(value: object) -> float:
    """A duration of any length (issue 14's retentions): seconds, or 90s, 15m, 2h, 7d, 1w."""
    expected = "a duration: seconds, or a number with s, m, h, d or w (as 7d)"
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", value.strip().lower()) \
        if isinstance(value, str) else None
    if match is None:
        raise _invalid(value, expected)
    return float(match[1]) * _SPAN_UNITS[match[2]]


def _size_cap(value: object) -> tuple[float, str]:
    """A size in bytes (K, M, G, T suffixes: powers of 1024), or a percentage of the
    data folder's volume; 0: no cap."""
    expected = "bytes (as 5G, 500M), a percentage of the volume (as 10%), or 0 for none"
    if isinstance(value, tuple) and len(value) == 2 and value[1] in ("bytes", "%"):
        n, unit = value
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        n, unit = float(value), "bytes"
    elif isinstance(value, str) and (match := re.fullmatch(
            r"(\d+(?:\.\d+)?)\s*(%|[bkmgt]?)(?:i?b)?", value.strip().lower())):
        if match[2] == "%":
            n, unit = float(match[1]), "%"
        else:
            n, unit = float(match[1]) * _SIZE_UNITS[match[2]], "bytes"
    else:
        raise _invalid(value, expected)
    if not isinstance(n, int | float) or n < 0 or (unit == "%" and n > 100):
        raise _invalid(value, expected)
    return float(n), unit


def _abs_path(value: object) -> Path:
    if isinstance(value, str | PurePath) and str(value) and "\0" not in str(value):
        path = Path(value)
        if path.is_absolute():
            return path
    raise _invalid(value, "an absolute path")


def _optional_path(value: object) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | PurePath) and str(value) and "\0" not in str(value):
        return Path(value)
    raise _invalid(value, "a file path")


def _address(value: object, *, empty_host: bool) -> HostPort:
    address = HostPort.parse(value) if isinstance(value, str) else value
    if isinstance(address, HostPort) and (address.host or empty_host):
        return address
    raise _invalid(value, "HOST:PORT, as 0.0.0.0:8883 or [::]:8883")


def _listen(value: object) -> HostPort:
    return _address(value, empty_host=False)


def _tunnel_listen(value: object) -> HostPort:
    return _address(value, empty_host=True)


def _metrics_listen(value: object) -> HostPort | None:
    if value is None or (isinstance(value, str) and value.lower() == "off"):
        return None
    return _address(value, empty_host=False)


def _advertise(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        if is_host(host):
            return host
    raise _invalid(value, "a host name or IP address (no port)")


def _peers(value: object) -> tuple[PeerSpec, ...]:
    expected = "comma-separated HOST[:PORT] or dns:NAME[:PORT]"
    if isinstance(value, str):
        items: Sequence[object] = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _invalid(value, expected)
    specs: list[PeerSpec] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue  # tolerate "a,,b" and a trailing comma
        spec = PeerSpec.parse(item.strip()) if isinstance(item, str) else item
        if not isinstance(spec, PeerSpec):
            raise _invalid(item, expected)
        if spec not in specs:
            specs.append(spec)
    return tuple(specs)


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
            _matching(NODE_ID_RE, "1-64 letters, digits, '.', '_' or '-'" + _FIRST_ALNUM),
            "ID",
            default_note="the hostname",
        ),
        _setting(
            "cluster",
            "Cluster name, as in the CA certificate.",
            _matching(CLUSTER_RE, "1-63 lowercase letters, digits or '-'" + _FIRST_ALNUM),
            "NAME",
        ),
        _setting("data_dir", "The directory kept in sync.", _abs_path, "DIR"),
        _setting("state_dir", "Index database, gate socket, status.", _abs_path, "DIR"),
        _setting("pki_dir", "ca.crt and this node's NODE.crt and NODE.key.", _abs_path, "DIR"),
        _setting("listen", "MQTTS broker address (port 0: any free).", _listen, "HOST:PORT"),
        _setting(
            "tunnel_listen",
            "rsync-over-TLS listener; ':PORT' takes listen's host.",
            _tunnel_listen,
            "[HOST]:PORT",
            default_note="listen's host, port 8873",
        ),
        _setting("advertise", "Host the peers should use for this node.", _advertise, "HOST"),
        _setting(
            "peers",
            "Comma-separated HOST[:PORT] or dns:NAME[:PORT] (port 8883 if left out).",
            _peers,
            "LIST",
        ),
        _setting(
            "dns_interval",
            "Seconds between DNS re-resolutions.",
            _seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "metrics_listen", "Prometheus metrics address, or 'off'.", _metrics_listen, "HOST:PORT"
        ),
        _setting(
            "lsyncd_delay",
            "lsyncd's batching delay in seconds (lsyncd is the second path: the agent "
            "pushes its own writes at once).",
            _seconds(positive=False),
            "SECONDS",
        ),
        _setting(
            "batch_quiet", "Change batch: seconds of quiet before the watcher scans.",
            _seconds(positive=False), "SECONDS"
        ),
        _setting(
            "batch_cap",
            "Change batch: longest wait, seconds, before the watcher scans.",
            _seconds(positive=False),
            "SECONDS",
        ),
        _setting(
            "max_clock_skew",
            "Seconds a peer's clock stamp may be ahead of this node's clock; writes stamped "
            "further ahead are refused, with a log line (a clock that far off, or a lie).",
            _seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "stalled_after",
            "Seconds after which content a peer announced and never delivered, or a queue "
            "to a peer that does not move, is reported as stalled and stops counting "
            "against `mesh health`.",
            _seconds(positive=True),
            "SECONDS",
        ),
        _setting(
            "keep_for",
            "How long replaced and deleted versions stay in the keep area once every "
            "known node holds something newer (`mesh versions`, `mesh restore`); 0: only "
            "as long as a pending restore or conflict copy needs them.",
            _span,
            "DURATION",
            default_note="7d",
        ),
        _setting(
            "keep_max",
            "Size cap of the keep area, oldest versions collected first (never what a "
            "pending restore needs): bytes (5G) or a percentage of the volume (10%); 0: "
            "none.",
            _size_cap,
            "SIZE|N%",
            default_note="10%",
        ),
        _setting(
            "forget_after",
            "This node's running time without hearing a peer after which tombstones no "
            "longer wait for that peer's acknowledgement; a version it brings back of "
            "what was deleted meanwhile is deleted again.",
            _span,
            "DURATION",
            default_note="30d",
        ),
        _setting("log_format", "Log format.", _choice("human", "json"), "human|json"),
        _setting(
            "log_level",
            "Log level.",
            _choice("debug", "info", "warning", "error", "critical"),
            "LEVEL",
        ),
        _setting(
            "config_file",
            "TOML file of settings (keys as the flags, with '_').",
            _optional_path,
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
    # The agent pushes its own writes at once (mesh.pushes); lsyncd is the second path, and a
    # longer delay gathers more events into each (mostly denied) gate call.
    lsyncd_delay: float = 1.0
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
                same_host = address.host == other.host or {address.host, other.host} & _WILDCARDS
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
