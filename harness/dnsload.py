"""A bounded DNS load generator to run inside a sandbox pod: a constant query rate for a fixed time.

``python -m harness.dnsload --server 10.96.0.10 --rate 500 --duration 5`` prints one JSON object: queries
sent, answered, failed, the longest gap between answers, and answers per 100 ms. Every query uses a fresh
socket (a fresh source port, as glibc does), so each is a new flow to conntrack. The run stops by itself: at
most ``rate x duration`` queries, then at most ``timeout`` more seconds for the last answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rdatatype

MAX_RATE = 20000
MAX_DURATION = 120.0


@dataclass
class Outcome:
    """What became of every query. :func:`run` calls :meth:`begin` once, then :meth:`answer` or :meth:`fail`
    once per query sent; a subclass can stream the figures instead of keeping them."""

    sent: int = 0
    answered: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failure_times: list[float] = field(default_factory=list)  # seconds since start, when each query was sent
    answer_times: list[float] = field(default_factory=list)
    start: float = 0.0  # CLOCK_MONOTONIC when the first query was due

    def begin(self, start: float) -> None:
        self.start = start

    def answer(self, sent_at: float, answered_at: float) -> None:
        self.answered += 1
        self.answer_times.append(answered_at)

    def fail(self, sent_at: float, why: str) -> None:
        self.failed += 1
        self.failure_times.append(round(sent_at, 4))
        self.errors[why] = self.errors.get(why, 0) + 1

    def summary(self, duration: float) -> dict[str, object]:
        answers = sorted(self.answer_times)
        edges = [0.0, *answers, duration]
        gap = max((b - a for a, b in itertools.pairwise(edges)), default=duration)
        bins = [0] * (int(duration * 10) + 1)
        for t in answers:
            bins[min(int(t * 10), len(bins) - 1)] += 1
        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "errors": self.errors,
            "longest_gap": round(gap, 4),
            "failure_times": self.failure_times[:200],
            "answers_per_100ms": bins,
        }


def run(server: str, port: int, names: list[str], *, rate: float, duration: float, timeout: float,
        outcome: Outcome | None = None, max_duration: float = MAX_DURATION) -> Outcome:  # fmt: skip
    """Send ``rate`` queries a second for ``duration`` seconds (both capped: ``MAX_RATE``, ``max_duration``),
    each timing out after ``timeout`` seconds, and record what became of them in ``outcome``."""
    rate, duration = min(rate, MAX_RATE), min(duration, max_duration)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    sel = selectors.DefaultSelector()
    outcome = Outcome() if outcome is None else outcome
    pending: dict[socket.socket, tuple[float, int]] = {}
    total = int(rate * duration)
    start = time.monotonic()
    outcome.begin(start)
    hard_stop = start + duration + timeout + 1.0
    index = 0
    while (index < total or pending) and time.monotonic() < hard_stop:
        now = time.monotonic()
        while index < total and start + index / rate <= now:
            msg = dns.message.make_query(names[index % len(names)], dns.rdatatype.A)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sent_at = now - start
            try:
                sock.connect((server, port))
                sock.send(msg.to_wire())
            except OSError as exc:
                sock.close()
                outcome.sent += 1
                outcome.fail(sent_at, f"send: {exc.strerror}")
                index += 1
                continue
            pending[sock] = (sent_at, msg.id)
            sel.register(sock, selectors.EVENT_READ)
            outcome.sent += 1
            index += 1
        next_send = start + index / rate if index < total else now + 0.05
        for key, _ in sel.select(timeout=max(0.0, min(next_send - time.monotonic(), 0.05))):
            sock = key.fileobj  # type: ignore[assignment]
            sent_at, qid = pending.pop(sock)
            sel.unregister(sock)
            try:
                reply = dns.message.from_wire(sock.recv(4096))
                ok = reply.id == qid and reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)
                why = "" if ok else f"rcode {dns.rcode.to_text(reply.rcode())}"
            except OSError as exc:  # e.g. ICMP port unreachable: nothing bound there
                ok, why = False, f"recv: {exc.strerror}"
            except dns.exception.DNSException as exc:
                ok, why = False, f"bad reply: {type(exc).__name__}"
            sock.close()
            if ok:
                outcome.answer(sent_at, time.monotonic() - start)
            else:
                outcome.fail(sent_at, why)
        now = time.monotonic()
        for sock, (sent_at, _) in list(pending.items()):
            if now - start - sent_at > timeout:
                del pending[sock]
                sel.unregister(sock)
                sock.close()
                outcome.fail(sent_at, "timeout")
    for sock, (sent_at, _) in pending.items():
        sel.unregister(sock)
        sock.close()
        outcome.fail(sent_at, "timeout")
    sel.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return outcome


def main() -> int:
    p = argparse.ArgumentParser(prog="dnsload")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--names", default="web.default.svc.cluster.local")
    p.add_argument("--rate", type=float, default=200.0, help=f"queries per second (at most {MAX_RATE})")
    p.add_argument("--duration", type=float, default=5.0, help=f"seconds (at most {MAX_DURATION:.0f})")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each answer")
    a = p.parse_args()
    outcome = run(a.server, a.port, a.names.split(","), rate=a.rate, duration=a.duration, timeout=a.timeout)
    json.dump(outcome.summary(min(a.duration, MAX_DURATION)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
