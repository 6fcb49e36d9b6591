"""The CoreDNS child wrapper with a real process: its exit is reported after its last line of output."""

from __future__ import annotations

import queue

from agent.coredns import CoreDnsProcess
from agent.events import ChildExited, Event


def test_the_exit_event_comes_after_the_last_line_so_the_cause_quotes_it() -> None:
    # Plenty of output, then the line that says why, then the exit: the waiter sees the exit long before
    # the output pump has read everything.
    script = (
        'i=0; while [ $i -lt 3000 ]; do echo "[INFO] line $i"; i=$((i+1)); done; echo "[FATAL] why"; exit 1'
    )
    events: queue.SimpleQueue[tuple[Event, str]] = queue.SimpleQueue()
    child: CoreDnsProcess

    def post(event: Event) -> None:
        events.put((event, child.recent_output[-1] if child.recent_output else ""))

    child = CoreDnsProcess(["sh", "-c", script], post)
    child.start()
    while True:
        event, last = events.get(timeout=10)
        if isinstance(event, ChildExited):
            break
    assert event.returncode == 1
    assert last == "[FATAL] why"
