"""kube-dns unreachable: a name the cache holds but whose entry has expired is answered stale with
``--serve-stale`` (the default, in both modes), and fails without it (``--serve-stale 0``), as node-cache's
Corefile has it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from harness import kubednslink
from harness import sandbox as sb
from harness.agentproc import AgentProcess
from harness.waiting import poll

NAME, ADDRESS = next(iter(sb.SERVICES.short_lived.items()))
# The cache keeps a 1 s record for CoreDNS's minimum TTL, 5 s: wait past it.
EXPIRED_AFTER = 6.5


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="nft") as sandbox:
        yield sandbox


def answer_lines(box: sb.Sandbox, name: str) -> list[list[str]]:
    """A pod's query to the ClusterIP (one try, one second): the answer section's A records, split."""
    argv = ["dig", f"@{sb.KUBE_DNS_IP}", name, "A", "+noall", "+answer", "+time=1", "+tries=1"]
    out = box.exec(box.pod(0), argv, check=False)
    return [line.split() for line in out.splitlines() if line and not line.startswith(";")]


def timed_answer(box: sb.Sandbox, name: str) -> tuple[list[tuple[str, str]], float]:
    """(TTL, address) of each A record a pod got for ``name``, and how long the query took."""
    started = time.monotonic()
    records = answer_lines(box, name)
    return [(r[1], r[4]) for r in records], time.monotonic() - started


@pytest.mark.parametrize(
    ("flags", "stale"),
    [((), True), (("--serve-stale-mode", "immediate"), True), (("--serve-stale", "0"), False)],
    ids=["default-verify", "immediate", "off"],
)
def test_an_expired_name_is_answered_stale_while_kube_dns_is_unreachable_only_with_serve_stale(
    box: sb.Sandbox, flags: tuple[str, ...], stale: bool
) -> None:
    verify = stale and "immediate" not in flags
    with AgentProcess(box, extra=flags) as agent:
        agent.wait_serving()
        assert box.dig(box.pod(0), sb.KUBE_DNS_IP, NAME) == ADDRESS  # asked once: cached
        time.sleep(EXPIRED_AFTER)
        with kubednslink.unreachable(box):
            never_cached = "kube-dns.kube-system.svc.cluster.local"
            assert box.dig(box.pod(0), sb.KUBE_DNS_IP, never_cached, check=False) == ""
            first, first_took = timed_answer(box, NAME)
            again, again_took = timed_answer(box, NAME)
        if not stale:
            assert first == again == [], (first, again)
            return
        # The expired entry, with a TTL of 0; in verify mode once kube-dns had its 0.5 s to answer, then at
        # once while the failed refresh's recheck lasts.
        assert first == again == [("0", ADDRESS)], (first, again, agent.tail())
        assert (0.4 <= first_took < 0.95) if verify else first_took < 0.3, first_took
        assert again_took < 0.3, again_took
        if verify:
            # kube-dns back: fresh answers once the failed refresh (the forward's 5 s) and its 10 s recheck
            # are over.
            back = time.monotonic()
            fresh = poll(lambda: (r := timed_answer(box, NAME)[0]) and r[0][0] != "0" and r, 20, every=0.5)
            assert fresh and fresh[0][1] == ADDRESS, fresh
            assert time.monotonic() - back < 16.5
        agent.wait_serving(1.0)  # kube-dns's absence never touched the cache itself


@pytest.mark.parametrize("mode", ["verify", "immediate"])
def test_with_kube_dns_healthy_verify_answers_an_expired_name_fresh_and_immediate_answers_it_stale(
    box: sb.Sandbox, mode: str
) -> None:
    with AgentProcess(box, extra=["--serve-stale-mode", mode]) as agent:
        agent.wait_serving()
        assert box.dig(box.pod(0), sb.KUBE_DNS_IP, NAME) == ADDRESS
        time.sleep(EXPIRED_AFTER)
        records, _ = timed_answer(box, NAME)
    # verify refreshes from kube-dns first (a fresh TTL); immediate hands out the expired entry (TTL 0) and
    # refreshes behind it: why verify is the default.
    assert records == ([("0", ADDRESS)] if mode == "immediate" else [(records[0][0], ADDRESS)]), records
    assert mode == "immediate" or records[0][0] != "0", records
