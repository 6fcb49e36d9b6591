"""Waits, from a pod namespace, for the first answer of the node-local cache: the time from the agent's
start to DNS being served.

Prints ``ready`` once it is polling, then one JSON object with the CLOCK_MONOTONIC time of the first answer
(the orchestrator notes the same clock when it starts the agent). One query every ``--every`` seconds, each
from a fresh socket, for at most ``--timeout`` seconds; before the agent holds the address the node answers
with ICMP unreachable or nothing, both of which only mean "not yet".

    python -m bench.firstanswer --server 169.254.20.10 --name web.default.svc.cluster.local
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import dns.message
import dns.rcode
import dns.rdatatype


def first_answer(server: str, name: str, *, every: float, timeout: float) -> dict[str, object]:
    query = dns.message.make_query(name, dns.rdatatype.A)
    wire = query.to_wire()
    tries = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tries += 1
        sent = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(every)
            try:
                sock.connect((server, 53))
                sock.send(wire)
                reply = dns.message.from_wire(sock.recv(4096))
            except (OSError, dns.exception.DNSException):
                time.sleep(max(0.0, every - (time.monotonic() - sent)))
                continue
        if reply.id == query.id and reply.rcode() == dns.rcode.NOERROR and reply.answer:
            return {"answered_at": time.monotonic(), "tries": tries}
    return {"answered_at": None, "tries": tries}


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.firstanswer")
    p.add_argument("--server", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--every", type=float, default=0.005, help="seconds between queries")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    a = p.parse_args()
    print("ready", flush=True)
    result = first_answer(a.server, a.name, every=a.every, timeout=min(a.timeout, 120.0))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
