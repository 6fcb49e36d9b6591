"""The prober's look at CoreDNS's process state, with real processes: a stopped one that does not answer
is reported as stopped within a fraction of a second; a running one that is merely silent is left to
the rounds."""

from __future__ import annotations

import ipaddress
import queue
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.events import Event, ProbeResult
from agent.health import Prober, ProbeSettings, process_state


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    with subprocess.Popen(["sleep", "30"]) as proc:
        yield proc
        proc.kill()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port with a socket bound that never answers (a hung server's, as the kernel sees it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_process_state_reads_the_kernels_letter(sleeper: subprocess.Popen[bytes]) -> None:
    assert process_state(sleeper.pid) in ("R", "S")  # just started, or asleep
    sleeper.send_signal(signal.SIGSTOP)
    time.sleep(0.05)
    assert process_state(sleeper.pid) == "T"
    sleeper.kill()
    sleeper.wait()
    assert process_state(sleeper.pid) is None


def run_prober(pid: int, port: int, seconds: float) -> list[ProbeResult]:
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    settings = ProbeSettings((ipaddress.ip_address("127.0.0.1"),), port, "health.node-local-dns.", None)
    prober = Prober(settings, pid, events.put)
    prober.start()
    time.sleep(seconds)
    prober.stop()
    results = []
    while not events.empty():
        event = events.get()
        assert isinstance(event, ProbeResult)
        results.append(event)
    return results


def test_a_stopped_silent_process_is_reported_stopped_between_rounds(
    sleeper: subprocess.Popen[bytes], silent_port: int
) -> None:
    sleeper.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    results = run_prober(sleeper.pid, silent_port, 0.9)
    stopped = [r for r in results if r.stopped]
    assert stopped, results
    assert "process state T (stopped)" in stopped[0].detail
    # The first round (0.5 s timeout) is silent; the state look between rounds comes within 0.1 s + 0.1 s.
    assert time.monotonic() - started < 1.0


def test_a_running_process_that_is_silent_is_left_to_the_rounds(
    sleeper: subprocess.Popen[bytes], silent_port: int
) -> None:
    results = run_prober(sleeper.pid, silent_port, 1.2)
    assert results and not any(r.stopped for r in results)
    assert all(r.silent and not r.ok for r in results)
