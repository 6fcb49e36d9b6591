"""The agent's stdout: events and CoreDNS's lines come from different threads, and each line arrives whole
even when the reader of stdout is slow and its pipe is full."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import threading, time
    from agent.coredns.process import OutputPump
    from agent.observe.logs import get_logger, setup_logging

    setup_logging("json")
    log = get_logger("test")
    pump = OutputPump(1, "plain", backlog=200)
    until = time.monotonic() + 1.5

    def coredns() -> None:
        n = 0
        while time.monotonic() < until:
            pump.offer(b'[INFO] 10.244.10.10:41973 - %d "A IN web.default.svc. udp 50" NOERROR' % n)
            n += 1
            if n % 50 == 0:
                time.sleep(0.0005)

    thread = threading.Thread(target=coredns)
    thread.start()
    while time.monotonic() < until:
        log.info("agent event", cause="x" * 100)
        time.sleep(0.0002)
    thread.join()
    pump.close()
    """
)


def test_events_and_coredns_lines_never_share_a_line_when_stdout_is_slow() -> None:
    received = bytearray()
    with subprocess.Popen(
        [sys.executable, "-c", WRITER],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 700):  # a reader slower than the writers: the pipe fills
            received += chunk
            time.sleep(0.0005)
        assert proc.wait(timeout=10) == 0
    lines = bytes(received).splitlines()
    events = [line for line in lines if line.startswith(b"{")]
    coredns = [line for line in lines if line.startswith(b"[INFO] ")]
    assert events and coredns
    mixed = [
        line
        for line in lines
        if not (line.startswith(b"{") and line.endswith(b"}") and line.count(b"{") == 1)
        and not (line.startswith(b"[INFO] ") and line.endswith(b"NOERROR") and b"{" not in line)
    ]
    assert not mixed, mixed[:2]
