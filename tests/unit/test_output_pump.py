"""CoreDNS's output pump: lines pass through unchanged, and a stdout that does not keep up never blocks the
reader (CoreDNS's pipe is always drained); what cannot be written is dropped and counted."""

from __future__ import annotations

import os
import threading
import time

import structlog.testing

from agent.coredns.process import OutputPump


def test_plain_lines_pass_through_unchanged(tmp_path: object) -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as out, os.fdopen(read_fd, "rb") as reader:
        pump = OutputPump(1, "plain", out=out)
        lines = [
            b"[INFO] plugin/reload: Running configuration SHA512 = 1234",
            b"[ERROR] plugin/errors: 2 x. A",
        ]
        for line in lines:
            pump.offer(line)
        pump.close()
        out.close()
        assert reader.read() == b"\n".join(lines) + b"\n"


def test_a_blocked_stdout_never_blocks_the_reader_and_drops_are_counted() -> None:
    read_fd, write_fd = os.pipe()  # nobody reads it until the end: its 64 KiB fill and the writer blocks
    dropped: list[int] = []
    with os.fdopen(write_fd, "wb") as out, os.fdopen(read_fd, "rb") as reader:
        pump = OutputPump(1, "plain", on_dropped=dropped.append, out=out, backlog=1000)
        line = (
            b'[INFO] 10.244.10.10:53211 - 4711 "A IN web.default.svc.cluster.local. udp 46 false 512" NOERROR'
        )
        started = time.monotonic()
        for _ in range(50_000):
            pump.offer(line)
        offered_in = time.monotonic() - started
        assert offered_in < 2.0  # no wait on the blocked stdout
        received = bytearray()
        drain = threading.Thread(target=lambda: received.extend(reader.read()))
        drain.start()
        pump.close(timeout=5)
        out.close()
        drain.join(5)
    written = received.count(b"\n")
    assert sum(dropped) > 0
    assert written + sum(dropped) == 50_000


def test_json_makes_each_line_a_coredns_output_event() -> None:
    with structlog.testing.capture_logs() as events:
        pump = OutputPump(42, "json")
        pump.offer(b"[ERROR] plugin/errors: 2 example.org. A: read udp: i/o timeout")
        pump.close()
    event = events[-1]
    assert (event["event"], event["log_level"], event["pid"]) == ("coredns output", "error", 42)
    assert event["msg"] == "plugin/errors: 2 example.org. A: read udp: i/o timeout"
