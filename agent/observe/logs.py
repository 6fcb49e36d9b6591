"""structlog set up once: JSON lines when stdout is not a terminal, readable lines when it is."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, BinaryIO

import structlog

from agent.settings import LogFormat


def setup_logging(fmt: LogFormat = "auto", level: int = logging.INFO) -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _StdoutLogger(),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger whose events carry ``component``; call sites log one event per state change, with a cause."""
    return structlog.get_logger(component=component)  # lazy: bound at first use, after setup_logging


# Every line the agent writes to stdout goes through this lock, whole. A BufferedWriter lets another thread's
# write in while it waits on a full pipe, so without it an event could land in the middle of CoreDNS's lines.
_stdout_lock = threading.Lock()


def write_stdout(data: bytes, out: BinaryIO | None = None) -> None:
    """Write ``data`` (whole lines) to stdout, or ``out``, with no other writer's bytes inside it."""
    with _stdout_lock:
        stream = out if out is not None else sys.stdout.buffer
        stream.write(data)
        stream.flush()


class _StdoutLogger:
    """structlog's output: one ``write_stdout`` per event."""

    def msg(self, message: str) -> None:
        write_stdout(message.encode(errors="replace") + b"\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg
