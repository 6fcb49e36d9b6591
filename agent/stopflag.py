"""The stop latch a signal handler sets and every bounded wait looks at.

A signal handler runs in the main thread between two bytecodes, possibly while that thread holds a lock:
``threading.Event.set()`` takes the event's lock and would deadlock if the main thread was inside that
event's ``wait()``. Recording a stop here is one attribute write, no lock; waits poll it (the iptables runner
already polls its child every 20 ms), so a SIGTERM during an xtables lock wait still cuts the wait short.
"""

from __future__ import annotations

import time
from typing import Protocol

_POLL = 0.02  # seconds between two looks at the latch in wait()


class Abort(Protocol):
    """What a bounded wait needs of a stop latch (``threading.Event`` fits too)."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float) -> bool: ...


class StopFlag:
    """Set once, by a signal handler or the loop; the first reason wins."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def request(self, reason: str) -> None:
        """Safe in a signal handler: one attribute write, no lock, no allocation beyond the argument."""
        if self._reason is None:
            self._reason = reason

    @property
    def reason(self) -> str | None:
        return self._reason

    def is_set(self) -> bool:
        return self._reason is not None

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, returning early (True) once the latch is set."""
        deadline = time.monotonic() + timeout
        while self._reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(_POLL, remaining))
        return True
