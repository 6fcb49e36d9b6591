"""Health probes of the CoreDNS child: real DNS queries on every local address, plus CoreDNS's /health.

The DNS probe asks for a name the Corefile answers by itself (no upstream involved), so an upstream outage
does not make every node restart its cache. The prober is a thread that only posts :class:`ProbeResult`s,
each carrying one :class:`Verdict` decided here: the supervisor maps it to an action and reads nothing else.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.events import Event, ProbeResult, Verdict
from agent.node.sockets import UdpQueues, socket_inodes, udp_receive_queues
from agent.observe.logs import get_logger
from agent.settings import IPAddress

log = get_logger("health")


@dataclass(frozen=True)
class ProbeSettings:
    """How CoreDNS is probed. Defaults detect a hang within 3 s: at most 0.5 s until the next round, then
    three rounds that each time out after 0.5 s (a timed-out round starts the next at once): about 2 s."""

    addresses: tuple[IPAddress, ...]
    port: int
    name: str
    health_url: str | None
    mark: int | None = None  # SO_MARK for the DNS probes (the probe rules match it)
    interval: float = 0.5  # seconds between rounds
    timeout: float = 0.5  # seconds per DNS query and per HTTP request
    # Datagrams per DNS probe: while unanswered, the same query again every timeout/sends. A CoreDNS that is
    # merely busy (a burst of uncached names against a slow kube-dns) lets its receive queue overflow, and a
    # single probe datagram dropped there looked like silence: three such rounds killed a serving CoreDNS.
    # It answers one of several; a hung CoreDNS answers none. Idle, the first is answered: no extra cost.
    sends: int = 5
    # /health is asked every this many rounds (2 s): the DNS probes catch a hang; /health adds CoreDNS's own
    # view of itself at a quarter of the cost.
    health_every: int = 4
    # Between rounds, every ``tick``, while CoreDNS works (WATCH_CPU_SHARE): datagrams waiting in the DNS
    # sockets on these addresses and port (the kernel's count, from sock_diag) start a round at once, its
    # first kernel view taken then. A hang that swallows pods' queries is confirmed 0.1 s later, not at the
    # next round; idle, only the rounds run (no idle cost), and a hang there has nothing to swallow until
    # queries come. Empty: the probed addresses and port.
    watch_addresses: tuple[IPAddress, ...] = ()
    watch_port: int | None = None
    tick: float = 0.1


@dataclass(frozen=True)
class Outcome:
    """One probe's (or one round's) result: its verdict (see :class:`Verdict` for what each means), what it
    saw, and how long it took."""

    verdict: Verdict
    detail: str
    latency: float  # seconds

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def silent(self) -> bool:
        return self.verdict.silent

    @property
    def stalled(self) -> bool:
        return self.verdict is Verdict.STALLED


class StalledError(Exception):
    """The kernel confirmed a hang while a probe waited for its answer; the message says what it saw."""


# Called while a probe goes unanswered, before each resend: a reason when CoreDNS is confirmed hung.
Unanswered = Callable[[], str | None]


# RFC 1035 4.1: header (id, flags with RD set, one question), then the question: QNAME, QTYPE A, QCLASS IN.
_QUERY_HEADER = bytes.fromhex("0000 0100 0001 0000 0000 0000")
_A_IN = bytes.fromhex("0001 0001")
# Reply codes by number (RFC 1035 and 6895), for the failure detail.
_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


def probe_query(name: str) -> bytes:
    """The probe's wire-format query, built once; :func:`probe_dns` gives each send a fresh id. Built by
    hand: the probe needs one fixed question and one header field of the answer, not a DNS library resident
    in the agent for its whole life (dnspython costs about 5 MiB)."""
    try:
        labels = [label.encode("idna") for label in name.rstrip(".").split(".") if label]
    except UnicodeError:
        labels = []
    if not labels or any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"probe name {name!r} is not a domain name")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return _QUERY_HEADER + qname + _A_IN


def probe_dns(
    address: IPAddress,
    port: int,
    name: str,
    timeout: float,
    *,
    mark: int | None = None,
    query: bytes = b"",
    sends: int = 1,
    unanswered: Unanswered | None = None,
) -> Outcome:
    """One UDP query, sent up to ``sends`` times within ``timeout`` while unanswered; healthy when CoreDNS
    answers NOERROR with at least one answer record.

    Hand-rolled on a plain socket (the header is all it reads): it runs twice a second on every node, and
    the agent's whole idle budget is a fraction of a percent of a core."""
    wire = os.urandom(2) + (query or probe_query(name))[2:]
    started = time.monotonic()
    deadline = started + timeout
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.connect((str(address), port))
            reply = _exchange(sock, wire, deadline, max(1, sends), unanswered)
    except TimeoutError:
        return Outcome(Verdict.SILENT, f"no answer from {address}:{port} within {timeout}s", timeout)
    except StalledError as exc:
        latency = time.monotonic() - started
        detail = f"no answer from {address}:{port} for {latency:.2f}s, {exc}"
        return Outcome(Verdict.STALLED, detail, latency)
    except OSError as exc:
        detail = f"query to {address}:{port} failed: {exc.strerror or exc}"
        return Outcome(Verdict.NOT_LISTENING, detail, time.monotonic() - started)
    latency = time.monotonic() - started
    rcode, answers = reply[3] & 0x0F, int.from_bytes(reply[6:8], "big")
    if rcode != 0 or not answers:
        text = _RCODES[rcode] if rcode < len(_RCODES) else f"RCODE{rcode}"
        return Outcome(Verdict.WRONG_ANSWER, f"{address}:{port} answered {text} for {name}", latency)
    return Outcome(Verdict.HEALTHY, "ok", latency)


def _exchange(
    sock: socket.socket, wire: bytes, deadline: float, sends: int, unanswered: Unanswered | None = None
) -> bytes:
    """Send ``wire``, again at even steps until ``deadline`` while no reply with its id came; the reply.
    Stray datagrams (another id) are skipped. TimeoutError when none came by the deadline; StalledError
    when ``unanswered``, asked before each resend, confirms a hang."""
    step = (deadline - time.monotonic()) / sends
    next_send, first = time.monotonic(), True
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError
        if sends and now >= next_send:
            if not first and unanswered is not None and (reason := unanswered()):
                raise StalledError(reason)
            first = False
            sock.send(wire)
            sends -= 1
            next_send = now + step if sends else deadline
        sock.settimeout(max(0.001, min(next_send, deadline) - now))
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            continue
        if len(reply) >= 12 and reply[:2] == wire[:2]:
            return reply


class HealthEndpoint:
    """CoreDNS's /health, one connection per probe (http.client: a fraction of requests' cost). Not kept
    alive between probes: a kept connection belongs to whichever CoreDNS of the shared port accepted it (the
    old one's, in a surge, which then fails the new agent's probe as it leaves), and it would make the
    agent's open descriptors depend on when CoreDNS last restarted."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url, self.path, self.timeout = url, parts.path or "/", timeout
        self._connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)

    def probe(self) -> Outcome:
        started = time.monotonic()
        try:
            self._connection.request("GET", self.path)
            response = self._connection.getresponse()
            response.read()
            self._connection.close()
        except TimeoutError:
            self._connection.close()
            detail = f"{self.url}: no answer within {self.timeout}s"
            return Outcome(Verdict.HEALTH_ENDPOINT_SILENT, detail, self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            self._connection.close()  # the next probe connects afresh
            detail = f"{self.url}: {exc.__class__.__name__}"
            return Outcome(Verdict.HEALTH_ENDPOINT_FAILED, detail, time.monotonic() - started)
        if response.status != 200:
            detail = f"{self.url}: HTTP {response.status}"
            return Outcome(Verdict.HEALTH_ENDPOINT_FAILED, detail, time.monotonic() - started)
        return Outcome(Verdict.HEALTHY, "ok", time.monotonic() - started)

    def close(self) -> None:
        self._connection.close()


# A silent probe round is a hang only while CoreDNS is idle: one that used at least this share of a core
# since the previous silent round is working through a backlog (a burst), not hung; a deadlocked or stopped
# Go process uses next to nothing.
BUSY_CPU_SHARE = 0.1
# ...but a CoreDNS that keeps a core busy and answers no probe for this many rounds in a row (10 s and more)
# is hung all the same (a livelock): its later busy rounds count as silence again.
MAX_BUSY_ROUNDS = 20
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The DNS sockets are watched between rounds only after a round in which CoreDNS used at least this share of
# a core (it serves queries: 1000 qps of cached names take several percent). An idle CoreDNS stays below it,
# and so the agent's idle cost stays that of the rounds: each tick of the watch is a thread wake-up and a
# netlink dump, about 0.2 ms of CPU, 10 times a second.
WATCH_CPU_SHARE = 0.01


def _stat(path: str) -> list[bytes] | None:
    """The fields of a /proc ``stat`` file after the name (state first), or None when it is gone."""
    try:
        stat = Path(path).read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces


def cpu_seconds(pid: int) -> float | None:
    """The CPU time the kernel counted for process ``pid`` (all its threads, user and system); None when
    it is gone."""
    fields = _stat(f"/proc/{pid}/stat")
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _share(before: tuple[float, float | None], after: tuple[float, float | None]) -> float:
    """The share of a core a process used between two (time, CPU seconds) readings; 0 when unknown."""
    (t0, c0), (t1, c1) = before, after
    return (c1 - c0) / (t1 - t0) if c0 is not None and c1 is not None and t1 > t0 else 0.0


class BusyMeter:
    """Tells a busy CoreDNS from a hung one when a probe round goes unanswered: from the CPU time the kernel
    counts for it since the previous unanswered round. Read only then, never while CoreDNS answers, so it
    costs nothing idle. The first unanswered round of a streak has nothing to compare with and counts."""

    def __init__(
        self,
        pid: int,
        *,
        read: Callable[[int], float | None] = cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid, self._read, self._clock = pid, read, clock
        self._last: tuple[float, float] | None = None  # (when, CPU seconds) at the last unanswered round
        self._busy_rounds = 0

    def unanswered(self) -> float | None:
        """After an unanswered round: CoreDNS's share of a core since the previous one when that says busy,
        else None (silence that counts toward a hang)."""
        now, cpu = self._clock(), self._read(self.pid)
        previous, self._last = self._last, (None if cpu is None else (now, cpu))
        if previous is None or cpu is None or now <= previous[0]:
            return None
        share = _share(previous, (now, cpu))
        if share < BUSY_CPU_SHARE or self._busy_rounds >= MAX_BUSY_ROUNDS:
            return None
        self._busy_rounds += 1
        return share

    def answered(self) -> None:
        self._last, self._busy_rounds = None, 0


@dataclass(frozen=True)
class KernelView:
    """What the kernel says of a process, read from /proc in well under a millisecond."""

    queued: int  # bytes waiting to be read in its UDP sockets
    cpu: float  # CPU seconds, all threads
    running: bool  # one of its threads is running or waiting for a CPU


def kernel_view(pid: int) -> KernelView | None:
    """``pid``'s view, or None when it is gone."""
    cpu = cpu_seconds(pid)
    if cpu is None:
        return None
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    running = any((f := _stat(f"/proc/{pid}/task/{tid}/stat")) and f[0] == b"R" for tid in threads)
    queues = udp_receive_queues(Path(f"/proc/{pid}"))
    return KernelView(sum(queues.get(inode, 0) for inode in socket_inodes(pid)), cpu, running)


class StallWatch:
    """Confirms a hang while a probe waits for its answer, without waiting for three silent rounds.

    Asked before each resend (every 0.1 s) of an unanswered probe, it compares the kernel's view of CoreDNS
    with the previous resend's: datagrams wait in its UDP sockets and none was read since, no thread of it
    ran or waited for a CPU, and it used next to no CPU. A deadlocked or frozen CoreDNS looks so; a busy one
    uses the CPU or drains its queue, and one starved of a CPU has a runnable thread. Costs nothing while
    probes are answered."""

    def __init__(
        self,
        pid: int,
        *,
        read: Callable[[int], KernelView | None] = kernel_view,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid, self._read, self._clock = pid, read, clock
        self._earlier: tuple[float, KernelView] | None = None

    def new_round(self) -> None:
        self._earlier = None

    def __call__(self) -> str | None:
        now, view = self._clock(), self._read(self.pid)
        earlier, self._earlier = self._earlier, (None if view is None else (now, view))
        if earlier is None or view is None or now <= earlier[0]:
            return None
        since, before = earlier
        share = _share((since, before.cpu), (now, view.cpu))
        if before.queued == 0 or view.queued < before.queued or before.running or view.running:
            return None
        if share >= BUSY_CPU_SHARE:
            return None
        return (
            f"coredns read none of the {view.queued} bytes waiting in its sockets for {now - since:.2f}s "
            f"(no thread running, {share:.0%} of a core)"
        )


class Prober:
    """Probes one CoreDNS child every ``interval`` until stopped; results are tagged with the child's pid."""

    def __init__(self, settings: ProbeSettings, pid: int, post: Callable[[Event], None]) -> None:
        self.settings = settings
        self.pid = pid
        self._post = post
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prober-{pid}", daemon=True)
        # The DNS sockets watched between rounds, and the kernel's view of their queues (the thread's own).
        self._watched = settings.watch_addresses or settings.addresses
        self._dns_queues: UdpQueues | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        url = self.settings.health_url
        health = HealthEndpoint(url, self.settings.timeout) if url else None
        rounds, query = 0, probe_query(self.settings.name)
        meter, watch = BusyMeter(self.pid), StallWatch(self.pid)
        self._open_queues()
        early, last_cpu = False, (time.monotonic(), cpu_seconds(self.pid))
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                with_health = health if rounds % self.settings.health_every == 0 else None
                rounds += 1
                if not early:  # an early round's first view was taken when it was called
                    watch.new_round()
                try:
                    outcome = probe_round(self.settings, query=query, health=with_health, unanswered=watch)
                except Exception as exc:  # a probe bug must show as failing probes, never as silence
                    log.exception("probe error", pid=self.pid)
                    outcome = Outcome(Verdict.PROBE_ERROR, f"probe error: {type(exc).__name__}: {exc}", 0.0)
                if self._stop.is_set():
                    return
                self._post(self._result(outcome, meter))
                now, cpu = time.monotonic(), cpu_seconds(self.pid)
                working = _share(last_cpu, (now, cpu)) >= WATCH_CPU_SHARE
                last_cpu = (now, cpu)
                early = self._between_rounds(started + self.settings.interval, watch, watching=working)
        finally:
            if health is not None:
                health.close()
            if self._dns_queues is not None:
                self._dns_queues.close()

    def _result(self, outcome: Outcome, meter: BusyMeter) -> ProbeResult:
        """The round's verdict, with silence told apart from a busy CoreDNS by the CPU it used."""
        verdict, detail = outcome.verdict, outcome.detail
        busy = meter.unanswered() if outcome.silent and not outcome.stalled else None
        if not outcome.silent:
            meter.answered()
        if busy is not None:
            verdict = verdict.but_busy()
            detail += f"; coredns busy ({busy:.0%} of a core since the last unanswered round)"
        return ProbeResult(self.pid, verdict, detail, outcome.latency, at=time.monotonic())

    def _open_queues(self) -> None:
        s = self.settings
        families = {socket.AF_INET if ip.version == 4 else socket.AF_INET6 for ip in self._watched}
        try:
            self._dns_queues = UdpQueues(s.watch_port or s.port, families)
        except OSError as exc:
            self._no_queues(exc, "no sock_diag for UDP")

    def _no_queues(self, exc: OSError, why: str) -> None:
        log.warning("not watching the dns sockets between probe rounds", pid=self.pid, error=str(exc),
                    cause=f"{why}: a hang is found by the next probe round")  # fmt: skip
        if self._dns_queues is not None:
            self._dns_queues.close()
        self._dns_queues = None

    def _between_rounds(self, due: float, watch: StallWatch, *, watching: bool) -> bool:
        """Waits until the next round is due; True when it starts early, because datagrams wait in the DNS
        sockets (``watch`` then holds the kernel's first view). Only ``watching``: else it just waits."""
        while True:
            left = due - time.monotonic()
            if self._dns_queues is None or not watching:
                self._stop.wait(max(0.0, left))
                return False
            if left <= 0 or self._stop.wait(min(self.settings.tick, left)):
                return False
            if self._waiting():
                watch.new_round()
                watch()  # the first view: the next, at the round's first resend, says whether any was read
                return True

    def _waiting(self) -> bool:
        """Datagrams wait in a DNS socket on a watched address."""
        assert self._dns_queues is not None
        try:
            queued = self._dns_queues.read()
        except OSError as exc:
            self._no_queues(exc, "sock_diag failed")
            return False
        return any(queued.get(ip, 0) for ip in self._watched)


def probe_round(
    settings: ProbeSettings,
    *,
    query: bytes = b"",
    health: HealthEndpoint | None = None,
    unanswered: Unanswered | None = None,
) -> Outcome:
    """Every local address answers the probe name, and /health says 200. The latency is the slowest DNS
    answer's."""
    slowest = 0.0
    for address in settings.addresses:
        outcome = probe_dns(
            address, settings.port, settings.name, settings.timeout, mark=settings.mark, query=query,
            sends=settings.sends, unanswered=unanswered,
        )  # fmt: skip
        slowest = max(slowest, outcome.latency)
        if not outcome.ok:
            return replace(outcome, latency=slowest)
    if health is not None:
        outcome = health.probe()
        if not outcome.ok:
            return replace(outcome, latency=slowest)
    return Outcome(Verdict.HEALTHY, "ok", slowest)
