"""The receiving agent's check of what a push asks its rsync daemon to do, read from the
stream before the daemon sees it (docs/DESIGN.md, "Data plane"; ``rsyncd`` has why each
lock exists).

An rsync client speaking the daemon protocol sends, before any file data, three things
in the clear: its greeting (``@RSYNCD: 32.0 sha512 ...\\n``), the module name
(``data\\n``), and the server arguments, each ended by a NUL and the list by an empty one
(protocol 30 and later). ``Prologue`` reads exactly that much from the bytes the tunnel
relays towards the daemon, and holds the arguments until all are in: the daemon gets them
only if :func:`check_server_args` accepts them. Anything else ends the push before the
daemon has read an argument.

Our client sends one shape only (``rsyncd.client_argv``), so the check accepts that shape
and refuses everything else, byte for byte: no carriage return anywhere (rsync drops
them from lines, so they could make the daemon read what we did not), no older protocol
(whose arguments end at newlines), no ``#early_input``, no ``--secluded-args`` (``-s``,
which sends the real arguments later, in the binary protocol). The check used to be the
daemon's ``pre-xfer exec`` hook, a Perl script run by every push (a shell and a Perl
start, about 3 ms of CPU per push); reading the arguments on their way in costs
microseconds, and refuses at least what the hook refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mesh.adapters.rsync import relay, rsyncd
from mesh.errors import RemoteProtocolError

MIN_PROTOCOL = 30  # arguments end at NULs from here on (rsync 3.0)
MAX_PROLOGUE = 8 * 1024  # our client's is about 150 bytes
MAX_ARGS = 16
_GREETING = re.compile(rb"@RSYNCD: (\d{1,3})\.\d{1,3}(?: [A-Za-z0-9_.-]{1,32}){0,16}\n")
_CAPABILITIES = re.compile(r"[.A-Za-z0-9]*")
_LETTERS = frozenset("rlptgoI")


def check_server_args(args: Sequence[str], keep: str, push_id: str) -> str | None:
    """None if ``args`` (as the client sends them: ``--server``, options, ``.``, the
    destination ``data/<keep>/in/<push id>/``) are what our client sends for this push;
    else why not. Accepted, in any option order: one short-option bundle of letters of
    ``rlptgoI`` with rsync's ``e.<capabilities>`` suffix, ``--numeric-ids`` at most
    once, and exactly one ``--copy-dest`` (joined or not) equal to ``../../../``."""
    if not rsyncd.valid_push_id(push_id) or not rsyncd.valid_keep_name(keep):
        return "the tunnel did not name this push"
    if len(args) < 3 or args[0] != "--server":
        return "not an rsync server request"
    if "." not in args:
        return "no end of options"
    end = args.index(".")
    expected = rsyncd.MODULE + rsyncd.staging_dest(keep, push_id)
    if list(args[end + 1:]) != [expected]:
        return f"destination must be {expected}"
    bundles: list[str] = []
    copy_dests: list[str] = []
    numeric = 0
    options = list(args[1:end])
    while options:
        arg = options.pop(0)
        if arg == "--copy-dest" and options:
            copy_dests.append(options.pop(0))
        elif arg.startswith("--copy-dest="):
            copy_dests.append(arg.removeprefix("--copy-dest="))
        elif arg == "--numeric-ids":
            numeric += 1
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            bundles.append(arg[1:])
        else:
            return f"option {arg[:60]!r} is not allowed"
    if copy_dests != [rsyncd.COPY_DEST]:
        return f"exactly one --copy-dest={rsyncd.COPY_DEST} is required"
    if numeric > 1:
        return "--numeric-ids more than once"
    if len(bundles) != 1:
        return "expected exactly one short-option bundle"
    letters, _, capabilities = bundles[0].partition("e")
    unknown = "".join(sorted(set(letters) - _LETTERS))
    if unknown:
        return f"short option(s) {unknown!r} not allowed"
    if _CAPABILITIES.fullmatch(capabilities) is None:
        return "malformed capability flags"
    return None


class Prologue:
    """Reads the client's greeting, module and arguments from the bytes ``feed`` gets,
    however they are split. The greeting and the module go on as each is read (the
    client waits for the daemon's answer to each before it sends more); the arguments go
    once all of them are in and accepted, with whatever came after them."""

    def __init__(self, keep: str, push_id: str) -> None:
        self.keep = keep
        self.push_id = push_id
        self.done = False
        self._buffer = b""
        self._passed = 0  # how much of the buffer went on
        self._lines = 0  # greeting and module read

    def feed(self, data: bytes) -> bytes:
        """What of the bytes fed so far may go on to the daemon now (once ``done``: all of
        them). ``RemoteProtocolError`` when they are not ours to pass on."""
        if self.done:
            return data
        self._buffer += data
        buffer = self._buffer
        if len(buffer) > MAX_PROLOGUE:
            raise RemoteProtocolError(f"no end of the server arguments in {MAX_PROLOGUE} bytes")
        if b"\r" in buffer:
            raise RemoteProtocolError("a carriage return in the daemon protocol's prologue")
        start = self._passed
        while self._lines < 2 and (end := buffer.find(b"\n", self._passed)) >= 0:
            self._line(buffer[self._passed:end + 1])
            self._lines += 1
            self._passed = end + 1
        if self._lines == 2 and (end := buffer.find(b"\0\0", self._passed)) >= 0:
            self._args(buffer[self._passed:end])
            self.done = True
            self._buffer = b""
            return buffer[start:]
        return buffer[start:self._passed]

    def _line(self, line: bytes) -> None:
        if self._lines == 1:
            if line != rsyncd.MODULE.encode() + b"\n":
                raise RemoteProtocolError(f"the module must be {rsyncd.MODULE!r}")
            return
        greeting = _GREETING.fullmatch(line)
        if greeting is None:
            raise RemoteProtocolError("not an rsync daemon greeting")
        if int(greeting[1]) < MIN_PROTOCOL:
            raise RemoteProtocolError(f"rsync protocol {int(greeting[1])}: "
                                      f"{MIN_PROTOCOL} or later is required")

    def _args(self, block: bytes) -> None:
        raw = block.split(b"\0")
        if len(raw) > MAX_ARGS:
            raise RemoteProtocolError(f"more than {MAX_ARGS} server arguments")
        try:
            args = [arg.decode("ascii") for arg in raw]
        except UnicodeDecodeError:
            raise RemoteProtocolError("a server argument that is not ASCII") from None
        if any("\n" in arg for arg in args):
            raise RemoteProtocolError("a newline in a server argument")
        why = check_server_args(args, self.keep, self.push_id)
        if why is not None:
            raise RemoteProtocolError(why)


class CheckedEnd(relay.End):
    """The relay end that reads the client's stream: it holds what arrives until the
    ``Prologue`` has passed it, then relays like any ``End``. A refusal is logged
    (``refused``), and both sides are closed: the daemon reads an end of input before
    any argument, and stops."""

    def __init__(self, prologue: Prologue, refused: Callable[[str], None]) -> None:
        super().__init__()
        self._prologue: Prologue | None = prologue
        self._refused = refused

    def data_received(self, data: bytes) -> None:
        prologue = self._prologue
        if prologue is None:
            super().data_received(data)
            return
        try:
            passed = prologue.feed(data)
        except RemoteProtocolError as err:
            self._prologue = None
            self.out = None  # nothing more goes to the daemon
            self._refused(err.reason)
            self.abort()
            self.ended()
            return
        if prologue.done:
            self._prologue = None
        if passed:
            super().data_received(passed)

    def ended(self) -> None:
        if self._prologue is not None and not self.read_done.done():
            self._prologue = None  # the client left before its arguments were all in
            self.out = None
        super().ended()
