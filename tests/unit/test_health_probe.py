"""The health probe's hand-built query and answer check, against dnspython and a real UDP socket."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from agent.health import MAX_BUSY_ROUNDS, BusyMeter, cpu_seconds, probe_dns, probe_query


@pytest.mark.parametrize("name", ["health.node-local-dns.", "health.node-local-dns", "a.b.c.example."])
def test_the_probe_query_is_what_dnspython_builds(name: str) -> None:
    ours = dns.message.from_wire(probe_query(name))
    theirs = dns.message.make_query(name, dns.rdatatype.A)
    assert probe_query(name)[2:] == theirs.to_wire()[2:]  # all but the random id
    assert ours.question == theirs.question


def test_a_name_that_is_not_a_domain_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a domain name"):
        probe_query("a" * 64 + ".example.")


def serve_once(rcode: int, answers: int) -> tuple[int, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def answer() -> None:
        with sock:
            data, peer = sock.recvfrom(512)
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.Rcode(rcode))
            for _ in range(answers):
                reply.answer.append(dns.rrset.from_text(reply.question[0].name, 5, "IN", "A", "127.0.0.1"))
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=answer)
    thread.start()
    return sock.getsockname()[1], thread


@pytest.mark.parametrize(
    ("rcode", "answers", "ok", "detail"),
    [(0, 1, True, "ok"), (0, 0, False, "answered NOERROR"), (3, 0, False, "answered NXDOMAIN"),
     (2, 0, False, "answered SERVFAIL")],
)  # fmt: skip
def test_only_a_noerror_answer_with_a_record_is_healthy(
    rcode: int, answers: int, ok: bool, detail: str
) -> None:
    port, thread = serve_once(rcode, answers)
    outcome = probe_dns(ipaddress.ip_address("127.0.0.1"), port, "health.node-local-dns.", 2.0)
    thread.join(timeout=5)
    assert outcome.ok is ok
    assert detail in outcome.detail


def test_a_probe_datagram_lost_on_the_way_is_sent_again_within_the_round() -> None:
    """A busy CoreDNS's full receive queue drops datagrams: the probe is resent while unanswered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    received: list[bytes] = []

    def answer_the_third() -> None:
        with sock:
            sock.settimeout(2.0)
            while len(received) < 3:
                data, peer = sock.recvfrom(512)
                received.append(data)
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.answer.append(dns.rrset.from_text(reply.question[0].name, 5, "IN", "A", "127.0.0.1"))
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=answer_the_third)
    thread.start()
    outcome = probe_dns(ipaddress.ip_address("127.0.0.1"), sock.getsockname()[1], "health.node-local-dns.",
                        0.5, sends=5)  # fmt: skip
    thread.join(timeout=5)
    assert outcome.ok, outcome
    assert len(set(received)) == 1  # the same query (same id) each time
    assert 0.2 <= outcome.latency < 0.5  # answered at the third send, 0.1 s apart


def test_an_unanswered_probe_is_silent_after_its_timeout_whatever_the_resends() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # bound, never answering: a hang
        sock.bind(("127.0.0.1", 0))
        outcome = probe_dns(ipaddress.ip_address("127.0.0.1"), sock.getsockname()[1],
                            "health.node-local-dns.", 0.3, sends=5)  # fmt: skip
        sent = 0
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while sock.recv(512):
                sent += 1
    assert outcome.silent and not outcome.ok
    assert sent == 5


class FakeProc:
    """CoreDNS's CPU time and the clock, moved by hand."""

    def __init__(self) -> None:
        self.now, self.cpu = 100.0, 5.0

    def read(self, pid: int) -> float | None:
        return self.cpu

    def clock(self) -> float:
        return self.now

    def round(self, cpu_share: float) -> None:
        self.now += 0.5
        self.cpu += 0.5 * cpu_share


def test_silent_rounds_of_an_idle_coredns_count_as_silence() -> None:
    proc = FakeProc()
    meter = BusyMeter(1, read=proc.read, clock=proc.clock)
    for _ in range(4):
        proc.round(0.005)  # a deadlocked Go process: timers and GC only
        assert meter.unanswered() is None


def test_silent_rounds_of_a_coredns_using_the_cpu_are_busy_after_the_first() -> None:
    proc = FakeProc()
    meter = BusyMeter(1, read=proc.read, clock=proc.clock)
    proc.round(0.8)
    assert meter.unanswered() is None  # nothing to compare with yet
    proc.round(0.8)
    assert meter.unanswered() == pytest.approx(0.8)
    meter.answered()
    proc.round(0.8)
    assert meter.unanswered() is None  # a new streak starts from nothing again


def test_a_coredns_busy_and_silent_for_too_long_counts_as_hung() -> None:
    proc = FakeProc()
    meter = BusyMeter(1, read=proc.read, clock=proc.clock)
    meter.unanswered()
    busy = []
    for _ in range(MAX_BUSY_ROUNDS + 3):
        proc.round(1.0)  # a livelock: a core spinning, no answer
        busy.append(meter.unanswered() is not None)
    assert busy == [True] * MAX_BUSY_ROUNDS + [False] * 3


def test_cpu_time_comes_from_proc_and_a_vanished_coredns_is_never_busy() -> None:
    assert cpu_seconds(os.getpid()) is not None
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert cpu_seconds(gone) is None
    meter = BusyMeter(gone)
    assert meter.unanswered() is None
    assert meter.unanswered() is None
