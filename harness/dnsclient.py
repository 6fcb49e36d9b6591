"""A dnspython client to run inside a sandbox namespace: ``python -m harness.dnsclient query SERVER NAME``.

Prints one JSON object, so tests read exactly what the resolver library saw.
"""

from __future__ import annotations

import argparse
import json
import sys

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def query(server: str, name: str, rtype: str, *, tcp: bool, port: int, timeout: float) -> dict[str, object]:
    msg = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
    send = dns.query.tcp if tcp else dns.query.udp
    try:
        reply = send(msg, server, timeout=timeout, port=port)
    except Exception as exc:  # the test reads the error text
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    answers = sorted(rr.to_text() for rrset in reply.answer for rr in rrset)
    return {"ok": True, "rcode": dns.rcode.to_text(reply.rcode()), "answers": answers}


def main() -> int:
    p = argparse.ArgumentParser(prog="dnsclient")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("query")
    q.add_argument("server")
    q.add_argument("name")
    q.add_argument("--type", default="A")
    q.add_argument("--tcp", action="store_true")
    q.add_argument("--port", type=int, default=53)
    q.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args()
    result = query(a.server, a.name, a.type, tcp=a.tcp, port=a.port, timeout=a.timeout)
    json.dump(result, sys.stdout)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
