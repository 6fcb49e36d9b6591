"""Keeps the interface and the rules as they should be, at a cost the idle budget allows.

The supervisor calls :meth:`NetworkReconciler.reconcile` on every sync tick and whenever a watcher posted
an event (after passing the event to :meth:`NetworkReconciler.note_change`). Per tick, while nothing
changed: the packet filter compares an in-process fingerprint (no process started), and the interface is
not looked at at all; it is checked when rtnetlink reported a change to it, and every
``full_check_interval`` seconds as a safety net.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.node.interface import Interface
from agent.node.packetfilter import FULL_CHECK_INTERVAL, PacketFilter
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics

log = get_logger("netreconcile")


@dataclass
class NetworkReconciler:
    interface: Interface | None
    packet_filter: PacketFilter | None
    metrics: Metrics
    full_check_interval: float = FULL_CHECK_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _interface_changed: threading.Event = field(default_factory=threading.Event, init=False)
    _next_interface_check: float = field(default=0.0, init=False)

    def note_change(self, source: str) -> None:
        """Record a watcher's event; safe from any thread. ``nftables`` needs no note: the packet filter's
        fingerprint has moved already."""
        if source == "interface":
            self._interface_changed.set()

    def reconcile(self) -> list[str]:
        """Repair what another program changed; returns what was changed (empty when nothing was)."""
        changes: list[str] = []
        now = self.clock()
        if self.interface is not None and (
            self._interface_changed.is_set() or now >= self._next_interface_check
        ):
            self._interface_changed.clear()
            self._next_interface_check = now + self.full_check_interval
            fixed = self.interface.ensure()
            if fixed:
                self.metrics.rules_restored.labels("address").inc(len(fixed))
                log.warning("interface restored", cause="changed by another program", changes=fixed)
            changes += fixed
        if self.packet_filter is not None:
            changes += self.packet_filter.reconcile()
        return changes
