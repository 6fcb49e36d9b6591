"""The health probe's hand-built query and answer check, against dnspython and a real UDP socket."""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from agent.health import probe_dns, probe_query


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
