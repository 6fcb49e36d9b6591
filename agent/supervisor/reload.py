"""The SIGUSR1 reload protocol: CoreDNS re-reads its Corefile in place, keeping its cache and sockets.

Sent to one child at a time and confirmed by that child's own output (``RELOAD_DONE``); an error line or no
confirmation within ``reload_timeout`` is a failed reload: CoreDNS keeps serving the old configuration, so
the previous Corefile is written back (a restart then reads what is being served) and the new one is tried
again after ``reload_retry``. A reload whose child is gone is neither confirmed nor failed: the next child
reads the current file at start.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.coredns.process import RELOAD_DONE
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.supervisor.seams import CorefileSource
from agent.supervisor.slot import PendingReload, Slot
from agent.supervisor.timing import Timing

log = get_logger("supervisor")


@dataclass
class Reloads:
    """The reloads in flight live on their slots; this holds the protocol and the retry after a failure."""

    corefile: CorefileSource
    path: Path  # the Corefile's path, for the logs
    metrics: Metrics
    timing: Timing
    clock: Callable[[], float]
    retry_at: float | None = None  # when to render and reload again after a failed reload

    def send(self, slot: Slot, cause: str, confirmed: str) -> None:
        """SIGUSR1 to the slot's child. ``confirmed`` is the Corefile to fall back to, unless a reload is
        still pending: then the one it would fall back to stays (the last the child confirmed)."""
        assert slot.child is not None
        previous = slot.reload.previous if slot.reload is not None else confirmed
        slot.reload = PendingReload(slot.child.pid, self.clock() + self.timing.reload_timeout, previous)
        slot.child.signal(signal.SIGUSR1)
        log.info("coredns reload requested", cause=cause, **slot.which)

    def on_output(self, slot: Slot, line: str) -> str | None:
        """A reload outcome line from the child the slot's reload was sent to: confirmed, or failed. Returns
        the Corefile written back after a failure (None: confirmed, or not written back)."""
        if RELOAD_DONE in line:
            slot.reload = None
            self.metrics.reloads.labels("ok").inc()
            log.info("coredns reloaded", cause="SIGUSR1 reload confirmed by coredns", **slot.which)
            return None
        return self.failed(slot, line)

    def expire(self, slot: Slot, now: float) -> str | None:
        """No confirmation in time: failed (see :meth:`failed`)."""
        if slot.reload is None or now < slot.reload.deadline:
            return None
        return self.failed(slot, f"no reload confirmation within {self.timing.reload_timeout:.0f}s")

    def failed(self, slot: Slot, why: str) -> str | None:
        """CoreDNS keeps serving the old configuration: the old file goes back so a restart uses it too.
        Returns it when written back."""
        assert slot.reload is not None
        previous, slot.reload = slot.reload.previous, None
        self.metrics.reloads.labels("failed").inc()
        self.retry_at = self.clock() + self.timing.reload_retry
        log.error("coredns reload failed", cause=why, keeping="the previous Corefile",
                  retry_in=self.timing.reload_retry, **slot.which)  # fmt: skip
        try:
            self.corefile.write(previous)
        except OSError as exc:
            log.error("corefile not restored", path=str(self.path), error=f"{exc.strerror or exc}")
            return None
        return previous

    def forget(self, slot: Slot, why: str) -> None:
        """The reload's child is gone: the next one reads the current file at start."""
        if slot.reload is not None:
            log.info("coredns reload dropped", cause=why, pid=slot.reload.pid)
            slot.reload = None

    def retry_due(self, now: float) -> bool:
        """True once, when the retry after a failed reload is due."""
        if self.retry_at is None or now < self.retry_at:
            return False
        self.retry_at = None
        return True
