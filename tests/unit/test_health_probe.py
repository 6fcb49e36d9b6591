"""The health probe's hand-built query and answer check, against dnspython and a real UDP socket; the one
verdict each probe round carries, against real sockets and a real HTTP server on a free port."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import psutil
import pytest

from agent.events import Event, ProbeResult, Verdict
from agent.health.probe import (
    MAX_BUSY_ROUNDS,
    BusyMeter,
    HealthEndpoint,
    KernelView,
    Prober,
    ProbeSettings,
    StallWatch,
    cpu_seconds,
    kernel_view,
    probe_dns,
    probe_query,
    probe_round,
)
from harness.waiting import poll


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


@contextlib.contextmanager
def udp_process(then: str) -> Iterator[tuple[int, int]]:
    """(pid, port) of a Python process bound to a UDP port of 127.0.0.1 (``s``), then running ``then``.
    Killed after (resumed first, should it be stopped)."""
    code = (
        "import socket, struct, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0))\n"
        "print(s.getsockname()[1], flush=True)\n" + then
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            yield proc.pid, int(proc.stdout.readline())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()


def sleeper_holding_an_unread_socket() -> contextlib.AbstractContextManager[tuple[int, int]]:
    """A process bound to a UDP port that it never reads, asleep: as a deadlocked CoreDNS looks."""
    return udp_process("time.sleep(30)\n")


def responder_answering_the_probe(work: float = 0.0) -> contextlib.AbstractContextManager[tuple[int, int]]:
    """A process that answers every query as CoreDNS answers the probe zone (one A record), after ``work``
    seconds of CPU (as a CoreDNS serving pods uses it)."""
    return udp_process(
        "while True:\n"
        "    q, peer = s.recvfrom(512)\n"
        f"    busy = time.process_time() + {work}\n"
        "    while time.process_time() < busy: pass\n"
        "    header = q[:2] + struct.pack('>HHHHH', 0x8180, 1, 1, 0, 0)\n"
        "    answer = struct.pack('>HHHIH', 0xC00C, 1, 1, 0, 4) + bytes([127, 0, 0, 1])\n"
        "    s.sendto(header + q[12:] + answer, peer)\n"
    )


def test_the_kernel_view_counts_unread_datagrams_in_the_process_own_sockets() -> None:
    with sleeper_holding_an_unread_socket() as (pid, port):
        idle = poll(lambda: (v := kernel_view(pid)) is not None and not v.running and v, 2, every=0.01)
        assert idle and idle.queued == 0  # asleep (it may still run for a moment after printing its port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for _ in range(3):
                client.sendto(probe_query("health.node-local-dns."), ("127.0.0.1", port))
        waiting = kernel_view(pid)
        assert waiting is not None and waiting.queued > 0
        me = kernel_view(os.getpid())
        assert me is not None and me.running  # this thread is running as it reads
    assert kernel_view(pid) is None


def test_a_probe_to_a_process_that_reads_none_of_its_socket_is_confirmed_stalled_within_the_round() -> None:
    with sleeper_holding_an_unread_socket() as (pid, port):
        outcome = probe_dns(ipaddress.ip_address("127.0.0.1"), port, "health.node-local-dns.", 0.5,
                            sends=5, unanswered=StallWatch(pid))  # fmt: skip
    assert outcome.silent and outcome.stalled, outcome
    assert outcome.latency < 0.3  # the second resend, not the timeout
    assert "read none of the" in outcome.detail and "no thread running" in outcome.detail


def view(queued: int, cpu: float, running: bool = False) -> KernelView:
    return KernelView(queued, cpu, running)


@pytest.mark.parametrize(
    ("before", "after", "stalled"),
    [
        (view(100, 1.0), view(150, 1.001), True),  # waiting datagrams, none read, idle: hung
        (view(0, 1.0), view(50, 1.001), False),  # nothing was waiting at the first look
        (view(150, 1.0), view(100, 1.001), False),  # some were read
        (view(100, 1.0), view(150, 1.05), False),  # half a core in 0.1 s: working through a backlog
        (view(100, 1.0, running=True), view(150, 1.001), False),  # runnable: starved of a CPU, not hung
        (view(100, 1.0), view(150, 1.001, running=True), False),
    ],
)
def test_a_stall_needs_unread_datagrams_no_runnable_thread_and_no_cpu(
    before: KernelView, after: KernelView, stalled: bool
) -> None:
    views, clock = [before, after], [10.0, 10.1]
    watch = StallWatch(1, read=lambda pid: views.pop(0), clock=lambda: clock.pop(0))
    assert watch() is None  # the first look has nothing to compare with
    assert (watch() is not None) == stalled


def test_each_round_starts_its_comparison_afresh() -> None:
    views = [view(100, 1.0), view(150, 1.0)]
    watch = StallWatch(1, read=lambda pid: views.pop(0))
    watch()
    watch.new_round()
    assert watch() is None


@pytest.mark.parametrize("working", [True, False], ids=["serving", "idle"])
def test_a_hang_between_rounds_of_a_working_coredns_is_confirmed_once_a_query_waits(working: bool) -> None:
    """Serving (it used the CPU in the last round): the DNS sockets are watched between rounds, and the hang
    is confirmed within 0.3 s, not at the next round 10 s later. Idle: nothing is watched (no idle cost)."""
    results: queue.SimpleQueue[Event] = queue.SimpleQueue()
    with responder_answering_the_probe(0.05 if working else 0.0) as (pid, port):
        settings = ProbeSettings((ipaddress.ip_address("127.0.0.1"),), port, "health.node-local-dns.", None,
                                 interval=10.0, tick=0.05)  # fmt: skip
        prober = Prober(settings, pid, results.put)
        prober.start()
        try:
            first = results.get(timeout=2)
            assert isinstance(first, ProbeResult) and first.ok, first
            os.kill(pid, signal.SIGSTOP)  # hung between two rounds, 10 s apart
            stopped = Path(f"/proc/{pid}/stat")  # stopped once the kernel delivered it: state T, not R
            assert poll(lambda: stopped.read_text().rsplit(")", 1)[1].split()[0] == "T", 2, every=0.01)
            hung = time.monotonic()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pod:
                pod.sendto(probe_query("web.default.svc.cluster.local."), ("127.0.0.1", port))
            if not working:
                with pytest.raises(queue.Empty):  # no round before the next, 10 s later
                    results.get(timeout=1)
                return
            second = results.get(timeout=2)
            took = time.monotonic() - hung
        finally:
            prober.stop()
    assert isinstance(second, ProbeResult) and second.verdict is Verdict.STALLED, second
    assert took < 0.3, took  # a tick to see the query waiting, then the round's first resend
    assert "read none of the" in second.detail


# One verdict per round -------------------------------------------------------------------------------------


@contextmanager
def health_server(status: int, *, answer: bool = True) -> Iterator[str]:
    """CoreDNS's /health on a free port, answering ``status`` (or reading the request and never answering)."""
    hold = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps connections open, as CoreDNS's Go server does

        def do_GET(self) -> None:
            if not answer:
                hold.wait(5)
                return
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None: ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        hold.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "answer", "verdict"),
    [(200, True, Verdict.HEALTHY), (503, True, Verdict.HEALTH_ENDPOINT_FAILED),
     (200, False, Verdict.HEALTH_ENDPOINT_SILENT)],
)  # fmt: skip
def test_the_health_endpoint_says_healthy_failed_or_silent(
    status: int, answer: bool, verdict: Verdict
) -> None:
    with health_server(status, answer=answer) as url:
        endpoint = HealthEndpoint(url, 0.3)
        try:
            outcome = endpoint.probe()
        finally:
            endpoint.close()
    assert outcome.verdict is verdict, outcome
    assert outcome.verdict.endpoint == ("dns" if verdict is Verdict.HEALTHY else "health")


def test_a_refused_query_means_not_listening_not_silence() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = probe_dns(
        ipaddress.ip_address("127.0.0.1"), port, "health.node-local-dns.", 0.5
    )  # nothing bound: ICMP unreachable
    assert outcome.verdict is Verdict.NOT_LISTENING and not outcome.silent, outcome
    assert outcome.verdict.endpoint == "dns"


def test_an_answer_that_is_not_the_probe_zones_is_a_wrong_answer() -> None:
    port, thread = serve_once(3, 0)  # NXDOMAIN: kube-dns does not know the probe zone
    outcome = probe_dns(ipaddress.ip_address("127.0.0.1"), port, "health.node-local-dns.", 2.0)
    thread.join(timeout=5)
    assert outcome.verdict is Verdict.WRONG_ANSWER and not outcome.silent, outcome


def test_a_round_whose_dns_answers_but_whose_health_endpoint_fails_says_so_with_the_dns_latency() -> None:
    with responder_answering_the_probe() as (_pid, port), health_server(500) as url:
        settings = ProbeSettings((ipaddress.ip_address("127.0.0.1"),), port, "health.node-local-dns.", url)
        endpoint = HealthEndpoint(url, 0.5)
        try:
            outcome = probe_round(settings, health=endpoint)
        finally:
            endpoint.close()
    assert outcome.verdict is Verdict.HEALTH_ENDPOINT_FAILED, outcome
    assert outcome.detail.endswith("/health: HTTP 500")


def test_silence_seen_while_coredns_was_busy_is_busy_and_keeps_its_endpoint() -> None:
    assert Verdict.SILENT.but_busy() is Verdict.BUSY
    assert Verdict.HEALTH_ENDPOINT_SILENT.but_busy() is Verdict.HEALTH_ENDPOINT_BUSY
    assert Verdict.HEALTH_ENDPOINT_BUSY.endpoint == "health" and Verdict.BUSY.endpoint == "dns"
    assert Verdict.STALLED.but_busy() is Verdict.STALLED  # the kernel confirmed the hang: not busy
    assert all(not v.busy for v in Verdict if v.silent)


def test_the_event_carries_the_verdict_and_nothing_to_decide_again() -> None:
    result = ProbeResult(1, Verdict.STALLED, "no answer", 0.2)
    assert not result.ok and result.verdict.silent
    assert ProbeResult(1, Verdict.HEALTHY, "ok", 0.001).ok


def test_the_health_endpoint_holds_no_connection_between_probes() -> None:
    """A kept connection belongs to whichever CoreDNS of the shared port accepted it: in a surge, the old
    one's, which fails the new agent's probe as it leaves; and the agent's open descriptors would depend on
    when CoreDNS last restarted (the soak's leak check read that as a leak)."""
    with health_server(200) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        endpoint = HealthEndpoint(url, 0.5)
        try:
            for _ in range(2):
                assert endpoint.probe().verdict is Verdict.HEALTHY
                ours = [
                    c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port
                ]
                assert not ours, ours
        finally:
            endpoint.close()
