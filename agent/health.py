"""Health probes of the CoreDNS child: real DNS queries on every local address, plus CoreDNS's /health.

The DNS probe asks for a name the Corefile answers by itself (no upstream involved), so an upstream outage
does not make every node restart its cache. The prober is a thread that only posts :class:`ProbeResult`s.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import requests

from agent.config import IPAddress
from agent.events import Event, ProbeResult


@dataclass(frozen=True)
class ProbeSettings:
    """How CoreDNS is probed. Defaults detect a hang within 3 s: 3 failed rounds at 0.5 s spacing, each
    bounded by a 0.5 s timeout, fail after at most 0.5 + 3 x 0.5 + 3 x 0.5 = 2.5 s."""

    addresses: tuple[IPAddress, ...]
    port: int
    name: str
    health_url: str | None
    mark: int | None = None  # SO_MARK for the DNS probes (the probe rules match it)
    interval: float = 0.5  # seconds between rounds
    timeout: float = 0.5  # seconds per DNS query and per HTTP request


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    latency: float  # seconds
    # No answer at all within the timeout: something holds the socket (the kernel gate is open) but does not
    # answer, so pod queries are being lost. A refused or wrong answer is a failure, not silence.
    silent: bool = False


def probe_dns(address: IPAddress, port: int, name: str, timeout: float, mark: int | None = None) -> Outcome:
    """One UDP query; healthy when CoreDNS answers NOERROR with an answer."""
    query = dns.message.make_query(name, dns.rdatatype.A)
    started = time.monotonic()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            reply = dns.query.udp(query, str(address), port=port, timeout=timeout, sock=sock)
    except dns.exception.Timeout:
        return Outcome(False, f"no answer from {address}:{port} within {timeout}s", timeout, silent=True)
    except OSError as exc:
        detail = f"query to {address}:{port} failed: {exc.strerror or exc}"
        return Outcome(False, detail, time.monotonic() - started)
    latency = time.monotonic() - started
    if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
        return Outcome(
            False, f"{address}:{port} answered {dns.rcode.to_text(reply.rcode())} for {name}", latency
        )
    return Outcome(True, "ok", latency)


def probe_http(session: requests.Session, url: str, timeout: float) -> Outcome:
    started = time.monotonic()
    try:
        response = session.get(url, timeout=timeout)
    except requests.Timeout:
        return Outcome(False, f"{url}: no answer within {timeout}s", timeout, silent=True)
    except requests.RequestException as exc:
        return Outcome(False, f"{url}: {type(exc).__name__}", time.monotonic() - started)
    if response.status_code != 200:
        return Outcome(False, f"{url}: HTTP {response.status_code}", time.monotonic() - started)
    return Outcome(True, "ok", time.monotonic() - started)


class Prober:
    """Probes one CoreDNS child every ``interval`` until stopped; results are tagged with the child's pid."""

    def __init__(self, settings: ProbeSettings, pid: int, post: Callable[[Event], None]) -> None:
        self.settings = settings
        self.pid = pid
        self._post = post
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prober-{pid}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                outcome = probe_round(self.settings, session)
                if self._stop.is_set():
                    return
                self._post(ProbeResult(self.pid, outcome.ok, outcome.detail, outcome.latency, outcome.silent))
                self._stop.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))


def probe_round(settings: ProbeSettings, session: requests.Session) -> Outcome:
    """Every local address answers the probe name, and /health says 200. The latency is the slowest DNS
    answer's."""
    slowest = 0.0
    for address in settings.addresses:
        outcome = probe_dns(address, settings.port, settings.name, settings.timeout, settings.mark)
        slowest = max(slowest, outcome.latency)
        if not outcome.ok:
            return Outcome(False, outcome.detail, slowest, outcome.silent)
    if settings.health_url:
        outcome = probe_http(session, settings.health_url, settings.timeout)
        if not outcome.ok:
            return Outcome(False, outcome.detail, slowest, outcome.silent)
    return Outcome(True, "ok", slowest)
