"""The values of the agent's settings (``mesh.config``): addresses (``HostPort``), peers
(``PeerSpec``), and the checks the settings table applies, each raising a one-line
``ConfigError`` that says what was expected."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final, Literal

from mesh.errors import ConfigError

BROKER_PORT: Final = 8883


TUNNEL_PORT: Final = 8873


MAX_SECONDS: Final = 3600.0


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"


# Swarm names services <stack>_<service>, so tasks.<stack>_<service> has an underscore.
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


FIRST_ALNUM = ", starting with a letter or digit"


_PORT_RE = re.compile(r"[0-9]{1,5}")


WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - names the bind-all hosts, binds nothing


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


def matching(pattern: re.Pattern[str], expected: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and pattern.fullmatch(value) is not None:
            return value
        raise _invalid(value, expected)

    return check


def one_of(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise _invalid(value, "one of " + ", ".join(choices))

    return check


def seconds(*, positive: bool) -> Callable[[object], float]:
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


def span(value: object) -> float:
    """A duration of any length (issue 14's retentions): seconds, or 90s, 15m, 2h, 7d, 1w."""
    expected = "a duration: seconds, or a number with s, m, h, d or w (as 7d)"
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", value.strip().lower()) \
        if isinstance(value, str) else None
    if match is None:
        raise _invalid(value, expected)
    return float(match[1]) * _SPAN_UNITS[match[2]]


def size_cap(value: object) -> tuple[float, str]:
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


def absolute_path(value: object) -> Path:
    if isinstance(value, str | PurePath) and str(value) and "\0" not in str(value):
        path = Path(value)
        if path.is_absolute():
            return path
    raise _invalid(value, "an absolute path")


def optional_path(value: object) -> Path | None:
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


def listen_address(value: object) -> HostPort:
    return _address(value, empty_host=False)


def tunnel_address(value: object) -> HostPort:
    return _address(value, empty_host=True)


def metrics_address(value: object) -> HostPort | None:
    if value is None or (isinstance(value, str) and value.lower() == "off"):
        return None
    return _address(value, empty_host=False)


def advertise_host(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        if is_host(host):
            return host
    raise _invalid(value, "a host name or IP address (no port)")


def peer_list(value: object) -> tuple[PeerSpec, ...]:
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


_SPAN_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
