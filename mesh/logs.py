"""Logging: human-readable lines by default, JSON lines for log shippers.

Warnings and errors are rate-limited (issue 13): a peer sending garbage made one
line per packet, 108,573 identical ``Received reserved packet`` lines from one
1.2 MB packet. ``RepeatFilter`` lets each distinct line through once per window
and at most a budget of lines per logger, and afterwards logs how many it held
back, with one of them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

REPEAT_WINDOW_S = 60.0
REPEAT_BUDGET = 20  # distinct warning lines per logger and window


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        node = getattr(record, "node", None)
        if node is not None:
            doc["node"] = node
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _NodeFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


@dataclass
class _Run:
    """One line let through: until when its repeats are held back, and how many were."""

    until: float
    record: logging.LogRecord
    held: int = 0


@dataclass
class _Budget:
    until: float
    used: int = 0
    held: int = 0
    example: str = ""


class RepeatFilter(logging.Filter):
    """Each distinct warning (or worse) once per ``window`` seconds, at most ``budget``
    distinct ones per logger per window; what it holds back is counted and summed up in
    one line when the window ends (at the next record, or ``flush``). Lines below
    ``level`` pass untouched. ``emit`` writes a summary (the handler's ``handle``)."""

    def __init__(self, emit: Callable[[logging.LogRecord], object], *,
                 window: float = REPEAT_WINDOW_S, budget: int = REPEAT_BUDGET,
                 level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.emit, self.window, self.budget, self.level = emit, window, budget, level
        self.clock = clock
        self._runs: dict[tuple[str, int, str], _Run] = {}
        self._budgets: dict[tuple[str, int], _Budget] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "summary", False):
            return True
        now = self.clock()
        self.flush(now)
        message = record.getMessage()
        with self._lock:
            run = self._runs.get((record.name, record.levelno, message))
            if run is not None:
                run.held += 1
                return False
            budget = self._budgets.setdefault((record.name, record.levelno),
                                              _Budget(now + self.window))
            if budget.used >= self.budget:
                budget.held += 1
                budget.example = budget.example or message
                return False
            budget.used += 1
            self._runs[(record.name, record.levelno, message)] = _Run(now + self.window, record)
            return True

    def flush(self, now: float | None = None) -> None:
        """Log the summaries of the windows that have ended."""
        now = self.clock() if now is None else now
        summaries: list[logging.LogRecord] = []
        with self._lock:
            for key, run in list(self._runs.items()):
                if run.until <= now:
                    del self._runs[key]
                    if run.held:
                        summaries.append(_summary(
                            run.record, "the line %r came %d more times in %.0f s (not logged)",
                            (_short(run.record.getMessage()), run.held, self.window)))
            for (name, level), budget in list(self._budgets.items()):
                if budget.until <= now:
                    del self._budgets[(name, level)]
                    if budget.held:
                        example = logging.LogRecord(name, level, "", 0, "", (), None)
                        summaries.append(_summary(
                            example, "%d more lines of %s in %.0f s were not logged (over %d "
                            "distinct lines), such as %r",
                            (budget.held, name, self.window, self.budget,
                             _short(budget.example))))
        for summary in summaries:
            self.emit(summary)


def _summary(like: logging.LogRecord, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    record = logging.LogRecord(like.name, like.levelno, like.pathname, like.lineno, msg, args,
                               None)
    record.summary = True
    return record


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_repeats: RepeatFilter | None = None


def flush_repeats() -> None:
    """Log the held-back counts of the windows that have ended (the agent calls this
    every second, so a flood that stopped is still summed up)."""
    if _repeats is not None:
        _repeats.flush()


def setup(node: str, fmt: Literal["human", "json"] = "human", level: str = "info") -> None:
    global _repeats
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(node)s %(levelname)-7s %(name)s: %(message)s",
            "%H:%M:%S"))
    handler.addFilter(_NodeFilter(node))
    _repeats = RepeatFilter(handler.handle)
    handler.addFilter(_repeats)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
