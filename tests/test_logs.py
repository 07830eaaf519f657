"""Rate-limited warnings (issue 13): a flood is one line and a count, never a line per
packet."""

from __future__ import annotations

import logging

from mesh.logs import RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(message: str, name: str = "amqtt.broker", level: int = logging.WARNING,
            ) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, (), None)


def _setup(**kw: object) -> tuple[RepeatFilter, list[str], Clock]:
    out: list[str] = []
    clock = Clock()
    repeats = RepeatFilter(lambda r: out.append(r.getMessage()), window=60.0, clock=clock,
                           **kw)  # type: ignore[arg-type]
    return repeats, out, clock


def _let_through(repeats: RepeatFilter, record: logging.LogRecord, out: list[str]) -> None:
    if repeats.filter(record):
        out.append(record.getMessage())


def test_a_flood_of_one_line_is_one_line_and_then_its_count() -> None:
    repeats, out, clock = _setup()
    line = "n9 Received reserved packet, which is forbidden: closing connection"
    for _ in range(108_573):
        _let_through(repeats, _record(line), out)
    assert out == [line]
    clock.now = 59.9
    repeats.flush()
    assert out == [line]
    clock.now = 60.0
    repeats.flush()
    assert len(out) == 2 and "came 108572 more times in 60 s (not logged)" in out[1]
    _let_through(repeats, _record(line), out)  # a new window: the line again
    assert out[2] == line


def test_distinct_lines_pass_up_to_a_budget_per_logger_and_the_rest_is_counted() -> None:
    repeats, out, clock = _setup(budget=3)
    for i in range(10):
        _let_through(repeats, _record(f"refused message {i}", name="mesh.engine.exchange"), out)
    _let_through(repeats, _record("another logger", name="mesh.adapters.rsync.tunnel"), out)
    assert out == ["refused message 0", "refused message 1", "refused message 2",
                   "another logger"]
    clock.now = 61
    repeats.flush()
    assert out[-1] == ("7 more lines of mesh.engine.exchange in 60 s were not logged (over 3 "
                       "distinct lines), such as 'refused message 3'")


def test_info_lines_are_left_alone() -> None:
    repeats, out, _ = _setup()
    for _ in range(3):
        _let_through(repeats, _record("joined", level=logging.INFO), out)
    assert out == ["joined"] * 3
