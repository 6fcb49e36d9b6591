"""CoreDNS twins (``--coredns-instances 2``): two CoreDNS processes on the same sockets, each supervised on
its own. A pod that queries the link-local address directly (IPVS mode, a custom dnsConfig) has nothing
behind the cache but the cache itself: with one CoreDNS a crash is an outage until the restart; with twins
the kernel hands the dead one's share to the other at once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness import sandbox as sb
from harness.agentproc import AgentProcess, Load, interface_exists, local_answers, our_rules, own_files
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP

TWINS = ["--coredns-instances", "2"]
RATE, DURATION = 1000, 6.0


def dns_listeners(box: sb.Sandbox, ip: str) -> int:
    """UDP sockets bound on ``ip``:53 in the node namespace (each CoreDNS has one)."""
    return len(box.exec(box.node, ["ss", "-H", "-u", "-l", "-n", "src", f"{ip}:53"]).splitlines())


def both_running(agent: AgentProcess) -> dict[str, object]:
    """Serving with both twins answering (the node's cause names a twin while one is not)."""
    return agent.wait_for(
        lambda s: s.get("serving") is True and s.get("detail") == "answering on every local address",
        20,
        "serving on both twins",
    )


def twin_events(agent: AgentProcess) -> list[tuple[object, object, object]]:
    return [
        (e.get("instance"), e.get("to"), e.get("cause"))
        for e in agent.events()
        if e.get("event") == "coredns state"
    ]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_one_twin_lost_under_load_on_the_link_local_address_costs_next_to_nothing(
    node_sandbox: sb.Sandbox, how: signal.Signals
) -> None:
    box = node_sandbox
    with AgentProcess(box, extra=TWINS) as agent:
        both_running(agent)
        assert dns_listeners(box, LOCAL_IP) == 2 and dns_listeners(box, KUBE_DNS_IP) == 2
        installed = our_rules(box)
        pids = agent.coredns_pids()
        assert len(pids) == 2, agent.tail()
        load = Load(box, rate=RATE, duration=DURATION, server=LOCAL_IP)
        time.sleep(2.0)
        os.kill(pids[0], how)
        result = load.result()
        assert result["sent"] == RATE * DURATION, result
        # What the lost twin had queued or was working on when it went: a few queries. With one CoreDNS every
        # query to the link-local address fails until the restart (the bench's "one of two killed" row).
        assert result["failed"] <= 10, result
        status = both_running(agent)  # the lost twin was restarted
        assert status["state"] == "running"
        assert pids[0] not in agent.coredns_pids() and pids[1] in agent.coredns_pids()
        events = twin_events(agent)
        assert any(i == 0 and to == "backoff" for i, to, _ in events), events
        assert not any(i == 1 and to == "backoff" for i, to, _ in events), events  # the other never stopped
        assert our_rules(box) == installed and local_answers(box)
        assert agent.stop() == 0
    assert our_rules(box) == [] and not interface_exists(box)


def test_twins_hand_the_node_over_to_twins_in_a_surge_upgrade(node_sandbox: sb.Sandbox) -> None:
    """The old agent waits for the new agent's CoreDNS, not for its own other twin, before it stops."""
    box = node_sandbox
    with AgentProcess(box, name="old", extra=TWINS) as old:
        both_running(old)
        installed = our_rules(box)
        load = Load(box, rate=RATE, duration=DURATION, server=LOCAL_IP)
        time.sleep(1.0)
        with AgentProcess(box, name="new", extra=[*own_files(box, "new"), *TWINS]) as new:
            both_running(new)
            assert dns_listeners(box, LOCAL_IP) == 4
            assert old.stop() == 0
            assert dns_listeners(box, LOCAL_IP) == 2
            result = load.result()
            assert result["sent"] == RATE * DURATION, result
            assert result["failed"] <= 2, result  # what the old sockets had queued as they closed
            assert our_rules(box) == installed and local_answers(box)
            assert new.stop() == 0
    assert our_rules(box) == [] and not interface_exists(box)
