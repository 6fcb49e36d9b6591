"""The CoreDNS child wrapper with a real process: its exit is reported after its last line of output."""

from __future__ import annotations

import queue

from agent.coredns.process import CoreDnsProcess
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


def test_a_stop_is_reported_at_once_and_the_exit_still_comes_after() -> None:
    import os
    import signal
    import time

    from agent.events import ChildStopped

    events: queue.SimpleQueue[tuple[Event, float]] = queue.SimpleQueue()
    child = CoreDnsProcess(["sleep", "30"], lambda event: events.put((event, time.monotonic())))
    pid = child.start()
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    event, seen_at = events.get(timeout=5)
    assert event == ChildStopped(pid, signal.SIGSTOP)
    assert seen_at - stopped_at < 0.1  # the kernel tells the parent; nothing polls
    os.kill(pid, signal.SIGSTOP)  # stopped again after a resume: reported again
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.05)
    os.kill(pid, signal.SIGSTOP)
    event, _ = events.get(timeout=5)
    assert event == ChildStopped(pid, signal.SIGSTOP)
    child.kill_group()
    event, _ = events.get(timeout=5)
    assert isinstance(event, ChildExited) and event.returncode == -signal.SIGKILL
    assert child.wait(timeout=1) == -signal.SIGKILL
